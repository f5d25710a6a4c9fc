from pipeline.cli import main_all

main_all()
