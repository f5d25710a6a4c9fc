"""The random-resized-crop sampler every pretraining sample and the ``crop`` generator's views go
through: torchvision's rule, drawn from our seeded NumPy stream.

A module of its own so that editing it re-runs exactly its users (``pipeline.provenance``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RRC_TRIES = 10  # torchvision's RandomResizedCrop: tries before the centre-crop fallback


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Random-resized-crop box ``(top, left, h, w)`` with torchvision's sampling rule.

    What the reference really runs: CropMAE defines a one-shot ``RRC`` override, but with its pinned
    torchvision (0.17) the library's own ``get_params`` replaces it on every subclass, SiamMAE's
    included. Up to ``RRC_TRIES`` draws of an area uniform in ``scale`` x image area and an aspect
    log-uniform in ``ratio``, kept when the box fits; else the largest centred box whose aspect is
    clamped to ``ratio``. The draws come from ``rng`` (our seeded stream), not torch's global RNG.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(RRC_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
