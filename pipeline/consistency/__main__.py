from pipeline.cli import dispatch
from pipeline.consistency import COMMANDS

dispatch("pipeline.consistency", COMMANDS)
