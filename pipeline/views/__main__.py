from pipeline.cli import dispatch
from pipeline.views import COMMANDS

dispatch("pipeline.views", COMMANDS)
