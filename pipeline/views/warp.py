"""BASELINE view generator ``warp``: weights-free pseudo-views (random perspective, elastic warp, crop)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from pipeline.imaging import resize_square
from pipeline.views.registry import ViewGenerator, register


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
