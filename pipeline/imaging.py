"""Image resize helpers shared by the stages (one definition of each preprocessing step)."""

from __future__ import annotations

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
