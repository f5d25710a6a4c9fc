from pipeline.cli import dispatch
from pipeline.report import COMMANDS

dispatch("pipeline.report", COMMANDS)
