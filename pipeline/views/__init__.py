"""Stage 1: the bag of views (generators, sharded HDF5 writing, merge, the training reader, figure).

``python -m pipeline.views <command>``: the commands are listed in ``pipeline.cli.COMMANDS``.
"""
