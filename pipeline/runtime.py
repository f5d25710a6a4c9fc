"""Process setup shared by every stage: logging and progress bars (infrastructure: nothing here
changes a number; seeds live in ``pipeline.seeding``).

Torch-free, so data and report jobs start fast; the torch side (devices, threads, DDP) is
``pipeline.devices``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

LOG = logging.getLogger("cdgmae")


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to stderr (captured by Snakemake's ``log:``) and optionally to a file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    return LOG


def progress(iterable: Iterable | None = None, **kwargs):
    """tqdm progress bar on stderr; prints periodic lines rather than redraws when not a TTY."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    return tqdm(iterable, **kwargs)
