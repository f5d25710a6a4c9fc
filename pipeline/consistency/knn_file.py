"""The k-NN file (``results/consistency/knn.npz``) as pretraining reads it.

A module of its own, with no encoder or feature code, so that the ``target=knn`` pretraining cells
depend on the file format only (``pipeline.provenance``): editing a feature encoder re-runs the
neighbour search, and pretraining only if the neighbours it writes change. Arrays: ``image_id``
(N,) str in ``list_imagenet`` order, ``neighbours`` (N, k) int64 global indices, never self and
never an image the neighbour search could not read (its own row is -1: the views stage, with the
same decoder and policy, left it out of the bag too), ``similarity`` (N, k), ``encoder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def read_knn(path: str | Path, image_ids: Sequence[str]) -> np.ndarray:
    """``neighbours`` of a knn.npz, checked against the current pretraining image list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"k-NN file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        for key in ("image_id", "neighbours"):
            if key not in data:
                raise KeyError(f"{path}: missing array {key!r}")
        stored, neighbours = data["image_id"], data["neighbours"]
    if len(stored) != len(image_ids) or any(a != b for a, b in zip(stored, image_ids)):
        raise ValueError(
            f"{path} was built for another image list ({len(stored)} images, now "
            f"{len(image_ids)}): re-run find_neighbours"
        )
    return neighbours
