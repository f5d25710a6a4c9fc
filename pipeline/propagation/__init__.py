"""Stage 4: training-free label propagation (DAVIS, VIP, JHMDB) and the standalone scorers.

Commands: ``python -m pipeline.propagation <command> --help``; ``COMMANDS`` maps each to its module
(``pipeline.cli``), and the rules derive their code inputs from it.
"""

COMMANDS = {
    "run": ("pipeline.propagation.runner:main", "propagate labels with one encoder on one dataset, and score"),
    "score": ("pipeline.propagation.score:main", "score a results folder: davis, vip or jhmdb"),
}
