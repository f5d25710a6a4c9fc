"""Torch process setup: the device, intra-op threads, global seeding."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    """Bound intra-op threads to what the Snakemake job was given."""
    if threads:
        torch.set_num_threads(int(threads))


def resolve_device(device: str | None = None) -> str:
    """The requested torch device, else ``cuda`` when one is visible, else ``cpu``."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
