from pipeline.cli import dispatch
from pipeline.propagation import COMMANDS

dispatch("pipeline.propagation", COMMANDS)
