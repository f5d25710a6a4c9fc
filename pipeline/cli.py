"""``python -m pipeline.<stage> <command> ...``: one entry point per stage, one module per command.

``COMMANDS`` is the one table of every command: stage -> command -> (``"module:function"`` taking
``argv``, one-line help); ``TOOLS`` the stage-less ones (``python -m pipeline.scrub``,
``python -m pipeline.config``). ``dispatch`` imports only the module asked for, so ``--help`` of a data
command never loads torch; the rules read the same table to derive their code inputs
(``pipeline.provenance``), and ``command_parser`` gives every command the same argparse header.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import job_server

# the stage subpackages, in workflow order: a stage never imports from a later one
STAGES = ("data", "sldm", "views", "consistency", "pretrain", "propagation", "report")

COMMANDS: dict[str, dict[str, tuple[str, str]]] = {
    "data": {
        "synthetic": ("pipeline.data.synthetic:main", "make one synthetic dataset in its official layout"),
        "check": ("pipeline.data.check:main", "check a dataset root against its official layout"),
        "vallist": ("pipeline.data.vallists:main", "write a reference-format val list of a dataset root"),
    },
    "sldm": {
        "train": ("pipeline.sldm.train:main", "train the S-LDM view generator on the pretraining images (resumable)"),
        "import-rcg": ("pipeline.sldm.rcg:main", "convert RCG's LDM-8 + MoCo v3 checkpoints into an sldm folder"),
    },
    "views": {
        "generate": ("pipeline.views.generate:main", "generate one shard of the bag of views"),
        "merge": ("pipeline.views.merge:main", "validate the shards and merge them into bag.h5"),
        "figure": ("pipeline.views.figure:main", "plot real images beside their generated views"),
        "generators": ("pipeline.views.generators:main", "list the registered view generators"),
    },
    "consistency": {
        "neighbours": (
            "pipeline.consistency.neighbours:main",
            "k nearest neighbours of every pretraining image (knn.npz)",
        ),
        "table1": ("pipeline.consistency.consistency_tables:table1_main", "Table 1: consistency per pair kind"),
        "table9": ("pipeline.consistency.consistency_tables:table9_main", "Table 9: consistency per generator"),
    },
    "pretrain": {
        "train": ("pipeline.pretrain.train:main", "train one cell with one seed (resumable)"),
        "flops": ("pipeline.pretrain.flops:main", "Table 8 GFLOPs per training sample"),
        "method-flops": (
            "pipeline.pretrain.method_flops:main",
            "GFLOPs per training sample and parameters of any cells (MAE-family table)",
        ),
        "init-random": (
            "pipeline.pretrain.checkpoints:init_random_main",
            "save a seeded random-init encoder checkpoint",
        ),
        "import-external": (
            "pipeline.pretrain.checkpoints:import_external_main",
            "convert an MAE/CropMAE encoder checkpoint (strict)",
        ),
        "describe": (
            "pipeline.pretrain.checkpoints:describe_main",
            "parameter counts of an arch, or a checkpoint's encoder",
        ),
    },
    "propagation": {
        "run": ("pipeline.propagation.run:main", "propagate labels with one encoder on one dataset, and score"),
        "score": ("pipeline.propagation.score:main", "score a results folder: davis, vip or jhmdb"),
    },
    "report": {
        "table": ("pipeline.report.table:table_main", "a propagation table (2, 3, 4, 5, 8, 10, figure 4)"),
        "config-table": ("pipeline.report.table:config_table_main", "Table 6 / 7 from the validated config"),
        "figure4": ("pipeline.report.figures:figure4_main", "Figure 4 from results/figure4.csv"),
        "loss-curves": ("pipeline.report.figures:loss_curves_main", "training-loss curves"),
        "summary": ("pipeline.report.summary:main", "results/summary.md: our numbers beside the paper's"),
        "provenance-diff": (
            "pipeline.report.provenance_diff:main",
            "what differs between the provenance records of two results folders",
        ),
    },
}

# commands outside the stages, run as ``python -m pipeline.<name>``: (``"module:function"``, help)
TOOLS: dict[str, tuple[str, str]] = {
    "config": ("pipeline.config:main", "validate config files and print the resolved config"),
    "scrub": (
        "pipeline.scrub:main",
        "verify every recorded digest under results/; --remove deletes what is corrupt and what was made from it",
    ),
}


def dispatch(stage: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> None:
    """Run ``commands[argv[0]]``'s module ``main`` with the remaining arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        width = max(map(len, commands))
        lines = [f"usage: python -m {stage} {{{','.join(commands)}}} ...", "", "commands:"]
        lines += [f"  {name:<{width}}  {text}" for name, (_, text) in commands.items()]
        print("\n".join(lines), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"python -m {stage}: unknown command {argv[0]!r}")
        raise SystemExit(0 if argv else 2)
    module, function = entry_point(commands[argv[0]][0])
    getattr(importlib.import_module(module), function)(argv[1:])


def entry_point(target: str) -> tuple[str, str]:
    """``"pipeline.views.generate:main"`` -> (module, function); the function defaults to ``main``."""
    module, _, function = target.partition(":")
    return module, function or "main"


def stage_commands(stage: str) -> dict[str, tuple[str, str]]:
    return COMMANDS[stage]


def command_module(stage: str, command: str) -> str:
    """The module ``python -m pipeline.<stage> <command>`` runs."""
    return entry_point(stage_commands(stage)[command][0])[0]


def command_parser(stage: str, command: str, doc: str | None) -> argparse.ArgumentParser:
    """The argparse parser of ``python -m pipeline.<stage> <command>``; ``doc`` is shown as is."""
    return argparse.ArgumentParser(
        prog=f"python -m pipeline.{stage} {command}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(stage: str) -> None:
    """The ``__main__`` of a stage package: in the run's warm job server where one may run it
    (``pipeline.job_server``; exits with the job's status), else here."""
    job_server.delegate(f"pipeline.{stage}", sys.argv[1:])
    dispatch(f"pipeline.{stage}", COMMANDS[stage])


def run(stage: str, argv: list[str]) -> None:
    """``python -m pipeline.<stage> *argv`` in this process (tests, notebooks)."""
    dispatch(f"pipeline.{stage}", stage_commands(stage), argv)


def run_tool(name: str, argv: list[str]) -> None:
    """``python -m pipeline.<name> *argv`` of a ``TOOLS`` entry in this process."""
    module, function = entry_point(TOOLS[name][0])
    getattr(importlib.import_module(module), function)(list(argv))


def main_all(argv: list[str] | None = None) -> None:
    """``python -m pipeline`` / ``cdgmae``: list every stage and command (as ``snakemake
    --list-rules`` lists rules), or run ``<stage> <command> ...``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        run(argv[0], argv[1:])
        return
    width = max(len(c) for cmds in COMMANDS.values() for c in cmds)
    lines = ["usage: python -m pipeline <stage> <command> ...  (or: cdgmae <stage> <command> ...)", ""]
    for stage in STAGES:
        lines.append(f"{stage}:  python -m pipeline.{stage} <command>")
        lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS[stage].items()]
    known = argv[:1] in ([], ["-h"], ["--help"])
    print("\n".join(lines), file=sys.stdout if known else sys.stderr)
    if not known:
        raise SystemExit(f"python -m pipeline: unknown stage {argv[0]!r}; stages: {', '.join(STAGES)}")
