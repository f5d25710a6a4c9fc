"""Stage 0: the embedded synthetic datasets and the readers of the official dataset layouts.

``python -m pipeline.data <command>``: the commands are listed in ``pipeline.cli.COMMANDS``.
"""
