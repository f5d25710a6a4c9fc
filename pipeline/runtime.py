"""Process setup shared by every stage: logging, progress bars, seeds derived from keys.

Torch-free, so data and report jobs start fast; the torch side (devices, threads, global seeding)
is ``pipeline.devices``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
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


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on ``keys`` (ints or strings), via NumPy's SeedSequence.

    Strings are hashed with SHA-256 so the result is stable across processes and Python versions
    (unlike ``hash()``).
    """
    entropy = []
    for key in keys:
        if isinstance(key, str):
            entropy.append(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        else:
            entropy.append(int(key))
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0] & ((1 << 63) - 1))
