"""Stage 5: the paper's tables, figures and summary.

Commands: ``python -m pipeline.report <command> --help``; ``COMMANDS`` maps each to its module
(``pipeline.cli``), and the rules derive their code inputs from it.
"""

COMMANDS = {
    "table": ("pipeline.report.tables:table_main", "a propagation table (2, 3, 4, 5, 8, 10, figure 4)"),
    "config-table": ("pipeline.report.tables:config_table_main", "Table 6 / 7 from the validated config"),
    "figure4": ("pipeline.report.figures:figure4_main", "Figure 4 from results/figure4.csv"),
    "loss-curves": ("pipeline.report.figures:loss_curves_main", "training-loss curves"),
    "summary": ("pipeline.report.summary:main", "results/summary.md: our numbers beside the paper's"),
}
