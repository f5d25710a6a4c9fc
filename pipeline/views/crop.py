"""BASELINE view generator ``crop``: CropMAE-style random resized crops of the real image."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.crop_sampler import random_resized_crop_box
from pipeline.imaging import resize_square
from pipeline.views.registry import ViewGenerator, register


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
