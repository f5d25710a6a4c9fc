"""Training samples of the single-image MAE-family methods (``mae``, ``lut``, ``pseudo-mae``):
registered in ``pipeline.pretrain.strategies.STRATEGIES`` beside ``cdgmae`` / ``cropmae`` /
``siammae``.

Data path: the images of the ImageNet-layout root (``--imagenet-root``; the synthetic stand-in in
the demo), exactly as CropMAE reads them, one image per sample, with the same bad-image policy
(``pipeline.imaging.ImageRejects``: an undecodable image is skipped for another drawn from the
sample's own RNG, listed in ``<state-dir>/rejects.csv``). Every random choice comes from the
sample's ``numpy`` generator (``EpochDataset``: a function of (seed, epoch, index)), so resume is
exact as for the other methods. A sample is ``(V, 3, S, S)`` float, ImageNet-normalised:

* ``mae`` (V = 1): MAE's augmentation, RandomResizedCrop(scale ``pretrain.mae.scale``,
  aspect ``pretrain.crop.ratio``) + horizontal flip.
* ``lut`` (V = 2): LUT's ``TwoGlobalViewAugmentation``: two independent simple resized crops
  (short side resized to S, ``pad``-pixel reflect padding, random S x S crop, flip, DeiT III's SRC);
  the second view also colour jitter (0.4, 0.4, 0.2, 0.1; p = 0.8) and one of grayscale /
  solarisation / Gaussian blur (DeiT III's three-augment).
* ``pseudo-mae`` (V = 2): view 0 MAE's simple augmentation, view 1 DINO's global-crop augmentation
  of an independent crop: RRC(scale ``pretrain.pseudo_mae.complex_scale``), flip, colour jitter
  (p = 0.8), grayscale (p = 0.2), then DINO's first global transform (blur p = 1) or second (blur
  p = 0.1, solarisation p = 0.2) with probability 1/2 each.

Photometric operations run on the uint8 crops with torchvision's functional ops; the blur radius
is drawn in pixels of the crop (PIL's GaussianBlur radius, sigma = radius) as at 224 px.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.crop_sampler import random_resized_crop_box
from pipeline.pretrain.augment import normalize, resized_crop
from pipeline.pretrain.strategies import STRATEGIES, ImageListDataset, build_cdgmae, image_list_builder

# ---------------------------------------------------------------------------------------------
# photometric augmentations on (3, S, S) uint8 tensors, every draw from ``rng``


def color_jitter(img: torch.Tensor, rng: np.random.Generator, strength=(0.4, 0.4, 0.2, 0.1)) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue): factors drawn uniformly,
    applied in a random order."""
    b, c, s, h = strength
    factors = [rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-h, h)]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in rng.permutation(4):
        img = ops[k](img, float(factors[k]))
    return img


def gaussian_blur(img: torch.Tensor, rng: np.random.Generator, radius=(0.1, 2.0)) -> torch.Tensor:
    """PIL's GaussianBlur with a radius drawn in ``radius`` (DINO / LUT's ``GaussianBlur``), as a
    Gaussian kernel of sigma = radius, 3 sigma wide, at most the image's side."""
    sigma = float(rng.uniform(*radius))
    side = min(img.shape[-2:])
    k = min(2 * math.ceil(3 * sigma) + 1, side if side % 2 else side - 1)
    return TF.gaussian_blur(img, [k, k], [sigma, sigma])


def grayscale(img: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(img, num_output_channels=3)


def solarize(img: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.solarize(threshold=128): pixels >= 128 inverted."""
    return TF.solarize(img, 128)


def three_augment(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """DeiT III's three-augment (LUT's ``RandomChoice``): one of grayscale, solarisation, blur."""
    k = int(rng.integers(3))
    return grayscale(img) if k == 0 else solarize(img) if k == 1 else gaussian_blur(img, rng)


def simple_resized_crop(image: torch.Tensor, rng: np.random.Generator, size: int, pad: int, flip: bool) -> torch.Tensor:
    """DeiT III's SRC as LUT's code: Resize(size) of the short side, RandomCrop(size, padding=pad,
    reflect), horizontal flip (p = 0.5)."""
    out = TF.resize(image, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if pad:
        out = TF.pad(out, [pad], padding_mode="reflect")
    h, w = out.shape[-2:]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = out[:, top : top + size, left : left + size]
    return TF.horizontal_flip(out) if flip and rng.random() < 0.5 else out


def rrc(image: torch.Tensor, rng: np.random.Generator, size: int, scale, ratio, flip: bool) -> torch.Tensor:
    """RandomResizedCrop (torchvision's sampler, ``pipeline.crop_sampler``) + flip."""
    box = random_resized_crop_box(rng, *image.shape[-2:], tuple(scale), tuple(ratio))
    return resized_crop(image, box, size, flip and bool(rng.random() < 0.5))


def dino_view(image: torch.Tensor, rng: np.random.Generator, size: int, scale, ratio) -> torch.Tensor:
    """DINO's global-crop augmentation (one of its two global transforms, chosen uniformly)."""
    out = rrc(image, rng, size, scale, ratio, True)
    if rng.random() < 0.8:
        out = color_jitter(out, rng)
    if rng.random() < 0.2:
        out = grayscale(out)
    if rng.random() < 0.5:  # global_transfo1
        out = gaussian_blur(out, rng)
    else:  # global_transfo2
        if rng.random() < 0.1:
            out = gaussian_blur(out, rng)
        if rng.random() < 0.2:
            out = solarize(out)
    return out


# ---------------------------------------------------------------------------------------------
# dataset


class SingleImageDataset(ImageListDataset):
    """One image of an ImageNet-layout list per sample, augmented by ``method``'s recipe."""

    def __init__(
        self,
        images: Sequence,
        *,
        method: str,
        img_size: int,
        seed: int,
        settings: dict,
        max_reject_fraction: float | None = None,
        rejects_listing: str | os.PathLike | None = None,
    ):
        if method not in VIEWS:
            raise KeyError(f"unknown MAE-family method {method!r}; known: {sorted(VIEWS)}")
        super().__init__(
            images,
            seed=seed,
            what=f"{method} images",
            max_reject_fraction=max_reject_fraction,
            rejects_listing=rejects_listing,
        )
        self.method, self.img_size, self.settings = method, int(img_size), settings

    def sample(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        image = self.image(index, rng)
        return normalize(torch.stack(VIEWS[self.method](image, rng, self.img_size, self.settings)))


def mae_views(image, rng, size, s) -> list[torch.Tensor]:
    return [rrc(image, rng, size, s["mae"]["scale"], s["crop"]["ratio"], s["crop"]["flip"])]


def lut_views(image, rng, size, s) -> list[torch.Tensor]:
    pad, flip = s["lut"]["pad"], s["crop"]["flip"]
    first = simple_resized_crop(image, rng, size, pad, flip)
    second = simple_resized_crop(image, rng, size, pad, flip)
    if rng.random() < 0.8:
        second = color_jitter(second, rng)
    return [first, three_augment(second, rng)]


def pseudo_mae_views(image, rng, size, s) -> list[torch.Tensor]:
    ratio = s["crop"]["ratio"]
    simple = rrc(image, rng, size, s["mae"]["scale"], ratio, s["crop"]["flip"])
    return [simple, dino_view(image, rng, size, s["pseudo_mae"]["complex_scale"], ratio)]


VIEWS = {"mae": mae_views, "lut": lut_views, "pseudo-mae": pseudo_mae_views}


@image_list_builder
def build_single_image(images: list, cell: dict, settings: dict, **reader) -> SingleImageDataset:
    return SingleImageDataset(images, method=cell["method"], img_size=settings["img_size"], settings=settings, **reader)


for _method in VIEWS:
    STRATEGIES.add(_method, build_single_image)
# cdgmae-lut trains on the bag of views exactly as cdgmae does (models_mae_family.CrossViewLUT)
STRATEGIES.add("cdgmae-lut", build_cdgmae)
