"""Augmentation of pretraining samples: random-resized-crop boxes, crops, flips, normalization.

Every function takes its randomness from an explicit ``numpy.random.Generator`` (see
``pipeline.pretrain.strategies``), never from a global state.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD


def to_chw(image: np.ndarray, what: str = "image") -> torch.Tensor:
    """HxWx3 uint8 array -> (3, H, W) uint8 tensor; a clear error for anything else."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(f"{what}: expected an HxWx3 uint8 RGB array, got {desc}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: crop ``box``, bilinear + antialias resize, flip."""
    top, left, h, w = box
    out = TF.resized_crop(
        image, top, left, h, w, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True
    )
    return TF.horizontal_flip(out) if flip else out


def normalize(views: torch.Tensor) -> torch.Tensor:
    """(K, 3, S, S) uint8 -> float32 in [0, 1], then ImageNet mean/std (as the reference's
    ToDtype(scale=True) + Normalize)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # in place on the one float copy: the same operations in the same order as
    # (x / 255 - mean) / std, without two more (K, 3, S, S) temporaries
    return views.float().div_(255.0).sub_(mean).div_(std)


def match_size(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring every image to the first generated view's resolution (the last image's if there is
    no view) so one shared crop box means the same region in each [inferred, spec §7]."""
    h, w = images[-1].shape[-2:]
    return [im if im.shape[-2:] == (h, w) else TF.resize(im, [h, w], antialias=True) for im in images]
