"""View generators for the bag of views, chosen by name from a small registry.

Every generator maps conditioning images and per-view seeds to views:

    gen.generate(images (B, H, W, 3) uint8, seeds (B, M) int64) -> (B, M, S, S, 3) float32 in [0, 1]

where S = ``image_size``. Each view depends only on (its conditioning image, its seed): every view
gets its own CPU ``torch.Generator`` / NumPy ``Generator``, so the result does not depend on the
batch it was generated in (diffusers "Reproducibility" guide; views-and-hdf5.md §4). The output is
float so that the caller can detect non-finite (fp16 NaN) views and regenerate them.

Registry (``GENERATORS``, complete once this module is imported):
- ``sd-variation`` (``pipeline.views.diffusion``): diffusers ``StableDiffusionImageVariationPipeline``
  from a local folder (CLIP image embedding as one cross-attention token, zero-token CFG).
- ``sldm`` (``pipeline.views.sldm``): a self-supervised LDM (Gen-SIS / RCG style) conditioned on the
  CLS embedding of a timm ViT, from one local folder written by ``save_sldm``.
- ``rcg`` (``pipeline.views.sldm``): the same loader on RCG's LDM-8 imported as an ``sldm`` folder
  (``python -m pipeline.sldm import-rcg``), its MoCo v3 representation as the one token, unguided.
- ``warp`` (BASELINE): weights-free pseudo-views (random perspective + elastic warp + crop).
- ``crop`` (BASELINE): CropMAE-style random resized crops of the real image.
``warp`` and ``crop`` set ``is_baseline = True``; their bags are never CDG-MAE diffusion views.
"""

from __future__ import annotations

import argparse
import math

import cv2
import numpy as np

from pipeline.imaging import random_resized_crop_box, resize_square
from pipeline.views import diffusion, sldm  # noqa: F401  (register sd-variation, sldm and rcg)
from pipeline.views.base import GENERATORS, ViewGenerator, register


def build_generator(
    name: str, settings: dict | None = None, image_size: int = 96, device: str | None = None
) -> ViewGenerator:
    """Instantiate the generator ``name`` with its ``views.generators.<name>`` settings."""
    if name not in GENERATORS:
        raise KeyError(f"unknown view generator {name!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[name](settings or {}, image_size=image_size, device=device)


@register("warp")
class WarpGenerator(ViewGenerator):
    """BASELINE pseudo-views: random perspective, smooth elastic displacement, random crop.

    Weights-free stand-in for diffusion views; warp-trained matching is known to generalize poorly
    (Truong et al., Warp Consistency), so results are labelled as a baseline everywhere.
    """

    is_baseline = True

    def _generate_one(self, image: np.ndarray, seed: int) -> np.ndarray:
        s = self.settings
        rng = np.random.default_rng(seed)
        img = resize_square(image, self.image_size).astype(np.float32) / 255.0
        S = self.image_size
        # perspective: jitter the 4 corners by up to `perspective` * S
        src = np.float32([[0, 0], [S - 1, 0], [S - 1, S - 1], [0, S - 1]])
        dst = src + rng.uniform(-1, 1, (4, 2)).astype(np.float32) * s.get("perspective", 0.12) * S
        H = cv2.getPerspectiveTransform(src, dst)
        img = cv2.warpPerspective(img, H, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        # elastic: Gaussian-smoothed random displacement field (Simard et al. 2003)
        alpha, sigma = s.get("elastic_alpha", 6.0), s.get("elastic_sigma", 8.0)
        if alpha > 0:
            d = rng.uniform(-1, 1, (2, S, S)).astype(np.float32)
            k = int(2 * math.ceil(3 * sigma) + 1)
            dx = cv2.GaussianBlur(d[0], (k, k), sigma) * alpha * S / 32
            dy = cv2.GaussianBlur(d[1], (k, k), sigma) * alpha * S / 32
            gy, gx = np.mgrid[0:S, 0:S].astype(np.float32)
            img = cv2.remap(img, gx + dx, gy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        # crop: a square of side sqrt(scale) * S at a random position, resized back
        lo, hi = s.get("crop_scale", [0.6, 1.0])
        side = max(2, int(round(math.sqrt(rng.uniform(lo, hi)) * S)))
        y0 = int(rng.integers(0, S - side + 1))
        x0 = int(rng.integers(0, S - side + 1))
        img = cv2.resize(img[y0 : y0 + side, x0 : x0 + side], (S, S), interpolation=cv2.INTER_LINEAR)
        return np.clip(img, 0.0, 1.0)


@register("crop")
class CropGenerator(ViewGenerator):
    """BASELINE: CropMAE-style random resized crops of the real image (no pose change)."""

    is_baseline = True

    def _generate_one(self, image: np.ndarray, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        img = resize_square(image, self.image_size)
        top, left, h, w = random_resized_crop_box(
            rng,
            img.shape[0],
            img.shape[1],
            tuple(self.settings.get("scale", [0.3, 1.0])),
            tuple(self.settings.get("ratio", [0.75, 4 / 3])),
        )
        crop = img[top : top + h, left : left + w]
        out = cv2.resize(
            crop,
            (self.image_size, self.image_size),
            interpolation=cv2.INTER_CUBIC if h < self.image_size else cv2.INTER_AREA,
        )
        return out.astype(np.float32) / 255.0


def main(argv=None) -> None:
    """List the registered generators (``python -m pipeline.views generators``)."""
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.views generators", description="View generator registry: list the names."
    )
    ap.parse_args(argv)
    for name, cls in sorted(GENERATORS.items()):
        kind = "BASELINE (weights-free)" if cls.is_baseline else "diffusion (local weights)"
        print(f"{name:<14}{kind:<28}{(cls.__doc__ or '').strip().splitlines()[0]}")
