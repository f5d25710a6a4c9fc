"""Stage 3: cross-view MAE pretraining (model, checkpoints, sampling strategies, training loop, FLOPs).

``python -m pipeline.pretrain <command>``: the commands are listed in ``pipeline.cli.COMMANDS``.
"""
