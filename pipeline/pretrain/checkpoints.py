"""Checkpoint files of the pretraining stage: atomic saving."""

from __future__ import annotations

import os
from typing import Any

import torch

from pipeline.io import atomic_path


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
