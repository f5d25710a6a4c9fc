"""Stage 0: the embedded synthetic datasets and the readers of the official dataset layouts.

Commands: ``python -m pipeline.data <command> --help``; ``COMMANDS`` maps each to its module
(``pipeline.cli``), and the rules derive their code inputs from it.
"""

COMMANDS = {
    "synthetic": ("pipeline.data.synthetic:main", "make one synthetic dataset in its official layout"),
    "check": ("pipeline.data.check:main", "check a dataset root against its official layout"),
    "vallist": ("pipeline.data.vallists:main", "write a reference-format val list of a dataset root"),
}
