"""``python -m pipeline.<stage> <command> ...``: one entry point per stage, one module per command.

A stage's ``__init__.py`` holds its ``COMMANDS`` table (command -> ``"module:function"`` taking
``argv``, and a one-line help);
``dispatch`` imports only the module asked for, so ``--help`` of a data command never loads torch.
The rules name the same table to derive their code inputs (``pipeline.provenance``).
"""

from __future__ import annotations

import importlib
import sys

# the stage subpackages, in workflow order: a stage never imports from a later one
STAGES = ("data", "views", "consistency", "pretrain", "propagation", "report")


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
    """``"pipeline.views.shards:main"`` -> (module, function); the function defaults to ``main``."""
    module, _, function = target.partition(":")
    return module, function or "main"


def stage_commands(stage: str) -> dict[str, tuple[str, str]]:
    """A stage's ``COMMANDS`` table (its ``__init__`` is plain data: cheap at workflow parse time)."""
    return importlib.import_module(f"pipeline.{stage}").COMMANDS


def command_module(stage: str, command: str) -> str:
    """The module ``python -m pipeline.<stage> <command>`` runs."""
    return entry_point(stage_commands(stage)[command][0])[0]


def run(stage: str, argv: list[str]) -> None:
    """``python -m pipeline.<stage> *argv`` in this process (tests, notebooks)."""
    dispatch(f"pipeline.{stage}", stage_commands(stage), argv)
