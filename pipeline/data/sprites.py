"""Textured sprites, the building blocks of every synthetic scene (``pipeline.data.scenes``).

- textures: smooth multi-scale noise plus an oriented grating, mapped through a ramp of 3-4
  colours drawn from one per-scene palette, so that raw colour does not separate an object from
  the background (they differ in pattern and position);
- sprites: a texture with a label map, placed in the world by the similarity that maps two local
  anchors onto two world points;
- blobs: lobed shapes (some with holes) of a family, and the rigid actor that moves one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.seeding import derive_seed

# ---------------------------------------------------------------------------------------------
# textures (one generator for background and objects: same colour statistics everywhere)


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean noise with correlation length ≈ ``cell`` pixels (bicubic upsampling)."""
    gh, gw = max(2, int(np.ceil(h / cell)) + 2), max(2, int(np.ceil(w / cell)) + 2)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(small, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    oy, ox = rng.integers(0, big.shape[0] - h + 1), rng.integers(0, big.shape[1] - w + 1)
    return big[oy : oy + h, ox : ox + w]


def scene_palette(rng: np.random.Generator, n: int = 4) -> np.ndarray:
    """(n, 3) colours shared by every texture of one scene (background and objects alike)."""
    return rng.uniform(15, 240, size=(n, 3))


def make_texture(
    rng: np.random.Generator, h: int, w: int, scale: float = 1.0, palette: np.ndarray | None = None
) -> np.ndarray:
    """HxWx3 uint8 texture: noise at two scales + an oriented grating through a colour ramp.

    The ramp's 3-4 colours are drawn (jittered, in a random order) from ``palette`` when given, so
    that all textures of a scene share one colour distribution and differ in pattern only.
    """
    field = smooth_noise(rng, h, w, rng.uniform(10, 24) * scale) + 0.6 * smooth_noise(
        rng, h, w, rng.uniform(2.5, 5) * scale
    )
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14) * scale
    fx, fy = 2 * np.pi / period * np.cos(angle), 2 * np.pi / period * np.sin(angle)
    x = fx * np.arange(w, dtype=np.float32)[None, :]
    y = fy * np.arange(h, dtype=np.float32)[:, None] + np.float32(rng.uniform(0, 2 * np.pi))
    grating = np.sin(x) * np.cos(y) + np.cos(x) * np.sin(y)  # sin(x + y) from 1-D factors
    field = field + np.float32(rng.uniform(0, 1.2)) * grating
    # ≈ ±2 standard deviations onto a ramp through 3-4 random colours, as a 256-level lookup
    level = np.clip((field - field.mean()) / (4 * field.std() + 1e-6) + 0.5, 0, 1)
    n_colors = int(rng.integers(3, 5))
    if palette is None:
        colors = rng.uniform(15, 240, size=(n_colors, 3))
    else:
        pick = rng.choice(len(palette), size=min(n_colors, len(palette)), replace=False)
        colors = np.clip(palette[pick] + rng.normal(0, 8, (len(pick), 3)), 0, 255)
    knots = np.linspace(0, 255, len(colors))
    ramp = np.stack([np.interp(np.arange(256), knots, colors[:, ch]) for ch in range(3)], 1).astype(np.int16)
    rgb = ramp[(level * 255).astype(np.uint8)]
    rgb += rng.integers(-8, 9, size=rgb.shape, dtype=np.int16)  # sensor-like grain
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# sprites: a texture with a label map, placed by the similarity that maps anchors (a, b) → (A, B)


@dataclass
class Sprite:
    texture: np.ndarray  # (h, w, 3) uint8
    labels: np.ndarray  # (h, w) uint8, 0 = transparent, else a part label
    a: np.ndarray  # (2,) local anchor mapped onto the first world point
    b: np.ndarray  # (2,) local anchor mapped onto the second world point


def similarity(a: np.ndarray, b: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """2x3 rotation+scale+translation mapping local points a → A and b → B."""
    da, dA = b - a, B - A
    k = np.hypot(*dA) / max(np.hypot(*da), 1e-9)
    ang = np.arctan2(dA[1], dA[0]) - np.arctan2(da[1], da[0])
    lin = k * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return np.hstack([lin, (A - lin @ a)[:, None]])


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """2x3 affine of ``outer ∘ inner``."""
    return outer[:, :2] @ inner + np.array([[0, 0, outer[0, 2]], [0, 0, outer[1, 2]]])


def apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ M[:, :2].T + M[:, 2]


def textured(rng, labels: np.ndarray, textures: dict) -> np.ndarray:
    """Fill each label of ``labels`` from a random window of that label's texture."""
    h, w = labels.shape
    out = np.zeros((h, w, 3), np.uint8)
    for lab in np.unique(labels):
        if lab == 0:
            continue
        tex = textures[int(lab)]
        oy, ox = rng.integers(0, tex.shape[0] - h + 1), rng.integers(0, tex.shape[1] - w + 1)
        m = labels == lab
        out[m] = tex[oy : oy + h, ox : ox + w][m]
    return out


# ---------------------------------------------------------------------------------------------
# blobs: lobed shapes of a family, and the rigid actor that moves one


def blob_family(index: int, seed: int) -> dict:
    """Shape parameters of a blob family (lobes, lobe depth, aspect, hole)."""
    rng = np.random.default_rng(derive_seed(seed, "blob-family", index))
    return dict(
        lobes=int(rng.integers(2, 7)),
        depth=float(rng.uniform(0.1, 0.4)),
        aspect=float(rng.uniform(0.5, 1.0)),
        hole=bool(rng.random() < 0.3),
    )


def blob_sprite(rng, radius: float, family: dict, palette: np.ndarray | None = None) -> Sprite:
    """A textured lobed blob of roughly ``radius`` px (anchors: centre → centre + radius·x̂)."""
    radius = max(radius, 2.0)
    size = int(np.ceil(2 * radius * (1 + family["depth"] + 0.1))) + 4
    c = size / 2.0
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = radius * (
        1
        + family["depth"] * np.cos(family["lobes"] * theta + rng.uniform(0, 2 * np.pi))
        + 0.06 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
    )
    pts = np.stack([c + r * np.cos(theta), c + family["aspect"] * r * np.sin(theta)], 1)
    labels = np.zeros((size, size), np.uint8)
    cv2.fillPoly(labels, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    if family["hole"]:
        cv2.circle(labels, (int(c), int(c)), max(1, int(radius * 0.35)), 0, -1)
    tex = make_texture(rng, size, size, scale=max(radius / 24, 0.4), palette=palette)
    return Sprite(tex, labels, np.array([c, c]), np.array([c + radius, c]))


class RigidActor:
    """A blob moving along a trajectory with rotation and scaling."""

    def __init__(self, sprite: Sprite, centers: np.ndarray, angles: np.ndarray, scales: np.ndarray):
        self.sprite, self.centers, self.angles, self.scales = sprite, centers, angles, scales
        self.radius = float(np.hypot(*(sprite.b - sprite.a)))

    def placements(self, t: int, joints=None):
        A = self.centers[t]
        direction = np.array([np.cos(self.angles[t]), np.sin(self.angles[t])])
        B = A + self.radius * self.scales[t] * direction
        return [(self.sprite, similarity(self.sprite.a, self.sprite.b, A, B))]
