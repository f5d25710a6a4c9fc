"""Cross-view consistency scores GS / LS / NPS of view pairs (paper §3.2, Tables 1 and 9).

For two views V1, V2 with global tokens g and patch tokens f_i (i = 1..L, row-major grid order):

    GS  = cos(g(V1), g(V2))
    LS  = 1/L * sum_i cos(f_i(V1), f_i(V2))                 same-position patches
    NPS = 1/L * sum_i max_j cos(f_i(V1), f_j(V2))           direction V1 -> V2 (recorded)

Batched matrix operations on any device; descriptor encoders are mean-centred first
(``centre_descriptors``).

The feature metrics above see what the encoder sees (the demo's SIFT grid is grayscale). Colour is
scored apart, from the images themselves, so a generator that transfers its source's colours but
not yet its layout shows it:

    mean_lab_distance = || mean_Lab(V1) - mean_Lab(V2) ||_2       CIE76 Delta E of the mean colours

(0 = same mean colour; lower is more consistent, unlike GS / LS / NPS; about 2.3 is a just
noticeable difference, black vs white is 100).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import rgb2lab

METRICS = ("global_sim", "local_sim", "nearest_patch_sim")
COLOUR_METRIC = "mean_lab_distance"


def pair_metrics(global_a, global_b, patches_a, patches_b, chunk: int = 64):
    """GS, LS, NPS of P pairs.

    global_*: (P, C); patches_*: (P, L, C) in the same spatial order. Returns (P, 3) float32 on the
    inputs' device. NPS goes a -> b. Pairs are processed ``chunk`` at a time to bound the (P, L, L)
    similarity tensor.
    """
    if patches_a.shape != patches_b.shape:
        raise ValueError(f"patch token shapes differ: {tuple(patches_a.shape)} vs {tuple(patches_b.shape)}")
    gs = F.cosine_similarity(global_a.float(), global_b.float(), dim=-1, eps=1e-8)  # (P,)
    ls, nps = [], []
    for s in range(0, patches_a.shape[0], chunk):
        a = F.normalize(patches_a[s : s + chunk].float(), dim=-1, eps=1e-8)  # (p, L, C)
        b = F.normalize(patches_b[s : s + chunk].float(), dim=-1, eps=1e-8)  # (p, L, C)
        ls.append((a * b).sum(-1).mean(-1))  # (p,) same-position cosines
        sim = torch.bmm(a, b.transpose(1, 2))  # (p, L, L): sim[i, j] = cos(a_i, b_j)
        nps.append(sim.amax(dim=2).mean(-1))  # (p,) best match in b for every patch of a
    empty = gs.new_zeros(0)
    return torch.stack([gs, torch.cat(ls) if ls else empty, torch.cat(nps) if nps else empty], dim=1)


def centre_descriptors(glob, patches):
    """Subtract the mean patch descriptor (over all images and positions) from every token.

    The global token of a descriptor encoder is the mean-pooled patch descriptor, so the centred
    global token is the mean of the centred patches, i.e. ``glob - mean``.
    """
    mean = patches.reshape(-1, patches.shape[-1]).mean(0)  # (C,)
    return glob - mean, patches - mean


def mean_lab_colours(images) -> np.ndarray:
    """(B, H, W, 3) uint8 sRGB images -> (B, 3) float64: each image's mean CIELAB colour (D65),
    the mean over its pixels' L*, a*, b*. ``np.linalg.norm`` of the difference of two rows is
    ``mean_lab_distance``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (B, H, W, 3) uint8 RGB images, got {images.shape} {images.dtype}")
    return rgb2lab(images).mean(axis=(1, 2))
