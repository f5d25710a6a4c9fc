"""Stage 3: cross-view MAE pretraining (model, checkpoints, sampling strategies, training loop, FLOPs).

Commands: ``python -m pipeline.pretrain <command> --help``; ``COMMANDS`` maps each to its module
(``pipeline.cli``), and the rules derive their code inputs from it.
"""

COMMANDS = {
    "train": ("pipeline.pretrain.main_pretrain:main", "train one cell with one seed (resumable)"),
    "flops": ("pipeline.pretrain.flops:main", "Table 8 GFLOPs per training sample"),
    "init-random": ("pipeline.pretrain.checkpoints:init_random_main", "save a seeded random-init encoder checkpoint"),
    "import-external": (
        "pipeline.pretrain.checkpoints:import_external_main",
        "convert an MAE/CropMAE encoder checkpoint (strict)",
    ),
    "describe": (
        "pipeline.pretrain.checkpoints:describe_main",
        "parameter counts of an arch, or a checkpoint's encoder",
    ),
}
