"""Stage 2: GS / LS / NPS consistency of view pairs (Tables 1 and 9) and the k-NN file pretraining reads.

``python -m pipeline.consistency <command>``: the commands are listed in ``pipeline.cli.COMMANDS``.
"""
