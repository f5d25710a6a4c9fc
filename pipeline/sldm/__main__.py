from pipeline.cli import main

main("sldm")
