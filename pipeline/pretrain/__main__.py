from pipeline.cli import dispatch
from pipeline.pretrain import COMMANDS

dispatch("pipeline.pretrain", COMMANDS)
