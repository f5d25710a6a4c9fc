"""Stage 5: the paper's tables, figures and summary.

``python -m pipeline.report <command>``: the commands are listed in ``pipeline.cli.COMMANDS``.
"""
