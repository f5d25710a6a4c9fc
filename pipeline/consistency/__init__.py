"""Stage 2: GS / LS / NPS consistency of view pairs (Tables 1 and 9) and the k-NN file pretraining reads.

Commands: ``python -m pipeline.consistency <command> --help``; ``COMMANDS`` maps each to its module
(``pipeline.cli``), and the rules derive their code inputs from it.
"""

COMMANDS = {
    "neighbours": ("pipeline.consistency.knn:main", "k nearest neighbours of every pretraining image (knn.npz)"),
    "table1": ("pipeline.consistency.tables:table1_main", "Table 1: consistency per pair kind"),
    "table9": ("pipeline.consistency.tables:table9_main", "Table 9: consistency per generator"),
}
