from pipeline.cli import main

main("propagation")
