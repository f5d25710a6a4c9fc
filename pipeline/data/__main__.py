from pipeline.cli import dispatch
from pipeline.data import COMMANDS

dispatch("pipeline.data", COMMANDS)
