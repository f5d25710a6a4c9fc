"""Image resize helpers shared by the stages (one definition of each preprocessing step)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps


def load_square(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read an image as RGB, resize the short side to ``size`` and centre-crop: (size, size, 3) uint8.

    The preprocessing of the bag's real images and of the consistency scores' image sources.
    Raises OSError/ValueError (with the file name) for an unreadable or corrupt image.
    """
    with Image.open(path) as im:
        im.load()  # decode fully now: truncated/corrupt JPEGs fail here, not later
        if im.width < 1 or im.height < 1:
            raise ValueError(f"{path}: empty image")
        im = im.convert("RGB")
        im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, C) image to (size, size); area interpolation when shrinking."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def pil_nearest(ids: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """PIL nearest resize of an id map to (H, W) (how DAVIS_480_880 and the VIP scorer resize)."""
    if ids.shape == tuple(hw):
        return ids
    return np.array(Image.fromarray(ids).resize((int(hw[1]), int(hw[0])), Image.NEAREST))


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
