"""Stage 4: training-free label propagation (DAVIS, VIP, JHMDB) and the standalone scorers.

``python -m pipeline.propagation <command>``: the commands are listed in ``pipeline.cli.COMMANDS``.
"""
