"""Deterministic generator of the embedded synthetic datasets, in the official on-disk layouts.

``python -m pipeline.data.synthetic --dataset {imagenet,videos,davis,vip,jhmdb} --out DIR
--settings JSON --seed S``

Every dataset is drawn from one scene distribution, so pretraining on the stills transfers to the
videos:

- textures: smooth multi-scale noise plus an oriented grating, mapped through a ramp of 3-4
  colours; every texture of a scene (background and objects alike) draws its colours from one
  per-scene palette, so raw pixel colour does not separate an object from the background or from
  another object — they differ in pattern (scale, orientation, colour order) and position
  (colour 1-NN propagation from frame 0 scores J ≈ 0.35 on the default DAVIS stand-in, barely
  above copying the first mask, ≈ 0.25);
- objects: textured blobs (lobed shapes, some with holes) and articulated "puppets" — people made
  of textured limb capsules whose joints are the 15 JHMDB joints (in the standard order) and whose
  parts carry the 20 VIP human-parsing classes;
- motion: object translation, rotation and scaling, limb articulation (one action family per
  JHMDB class), occlusion by other objects and by unannotated distractors, and camera pan, zoom
  and roll over a larger background canvas.

ImageNet "classes" are shape families (blob families and puppet action families); the still of an
image is one frame of such a scene. Each item draws from its own RNG seeded by
``derive_seed(seed, dataset, index)``, and the encoders run with fixed settings, so the same seed
gives byte-identical files. A dataset is written into a temporary folder next to ``--out`` and
renamed at the end, with a ``manifest.json`` (settings, seed, counts).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import load_settings
from pipeline.constants import pascal_palette
from pipeline.data.readers import JHMDB_JOINTS, VIP_CLASSES, write_vallist
from pipeline.runtime import derive_seed, progress, setup_logging

LOG = logging.getLogger("cdgmae.synthetic")

DATASETS = ("imagenet", "videos", "davis", "vip", "jhmdb")
JPEG_QUALITY = 90  # fixed encoder settings: same pixels → same bytes
PNG_COMPRESSION = 3

# JHMDB's 21 action classes, in the official order; extra classes get generic names.
JHMDB_CLASSES = (
    "brush_hair",
    "catch",
    "clap",
    "climb_stairs",
    "golf",
    "jump",
    "kick_ball",
    "pick",
    "pour",
    "pullup",
    "push",
    "run",
    "shoot_ball",
    "shoot_bow",
    "shoot_gun",
    "sit",
    "stand",
    "swing_baseball",
    "throw",
    "walk",
    "wave",
)

VIP = {name: i for i, name in enumerate(VIP_CLASSES)}
J = {name: i for i, name in enumerate(JHMDB_JOINTS)}

# Puppet proportions in body units (≈ 0.9 unit from ankle to the top of the head).
BODY = dict(
    torso=0.30,
    neck=0.085,
    head_r=0.065,
    shoulder=0.085,
    hip=0.055,
    upper_arm=0.15,
    forearm=0.14,
    thigh=0.20,
    shin=0.19,
    limb_w=0.05,
    hand_r=0.028,
    foot_r=0.035,
)


# ---------------------------------------------------------------------------------------------
# textures (one generator for background and objects: same colour statistics everywhere)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean noise with correlation length ≈ ``cell`` pixels (bicubic upsampling)."""
    import cv2

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
    field = _smooth_noise(rng, h, w, rng.uniform(10, 24) * scale) + 0.6 * _smooth_noise(
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


def _textured(rng, labels: np.ndarray, textures: dict) -> np.ndarray:
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
    import cv2

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


# ---------------------------------------------------------------------------------------------
# articulated puppet (JHMDB joints, VIP parts)


def action_family(index: int, seed: int) -> dict:
    """Limb-angle oscillators of one action (radians, per frame), as in a JHMDB class."""
    rng = np.random.default_rng(derive_seed(seed, "action-family", index))
    # angles: shoulder, elbow (relative), hip, knee (relative); right side, left side
    base = np.concatenate(
        [rng.uniform(0.1, 2.4, 2), rng.uniform(-1.4, 1.4, 2), rng.uniform(-0.1, 0.4, 2), rng.uniform(-0.9, 0.0, 2)]
    )
    amp = np.concatenate(
        [rng.uniform(0.1, 1.0, 2), rng.uniform(0.0, 0.9, 2), rng.uniform(0.0, 0.5, 2), rng.uniform(0.0, 0.6, 2)]
    )
    phase = rng.uniform(0, 2 * np.pi, 8)
    if rng.random() < 0.5:  # alternating limbs (walk/run-like) vs. symmetric (clap/jump-like)
        phase[1::2] = phase[0::2] + np.pi
    return dict(
        base=base,
        amp=amp,
        phase=phase,
        omega=float(rng.uniform(0.25, 0.8)),
        bob=float(rng.uniform(0, 0.04)),
        lean=float(rng.uniform(0, 0.15)),
        stride=float(rng.uniform(-0.01, 0.01)),
    )


def _rot(v: np.ndarray, ang: np.ndarray) -> np.ndarray:
    """Rotate (T, 2) vectors by (T,) angles (image coordinates, y down)."""
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    return np.concatenate([v[:, :1] * c - v[:, 1:] * s, v[:, :1] * s + v[:, 1:] * c], 1)


class Puppet:
    """A person of textured limb capsules; ``joints(t)`` follows JHMDB's 15-joint order.

    Sprites are built at ``unit`` pixels per body unit; ``pose`` holds per-frame pelvis position
    (T, 2), scale (T,) in pixels per unit, lean (T,) and the 8 limb angles (T, 8).
    """

    def __init__(
        self,
        rng,
        unit: float,
        frames: int,
        pelvis: np.ndarray,
        scale: np.ndarray,
        action: dict,
        t0: float = 0.0,
        palette: np.ndarray | None = None,
    ):
        self.unit = unit
        self.palette = palette
        t = np.arange(frames, dtype=np.float64) + t0
        w = action["omega"]
        self.angles = action["base"][None] + action["amp"][None] * np.sin(
            w * t[:, None] + action["phase"][None]
        )  # (T, 8)
        self.lean = action["lean"] * np.sin(0.5 * w * t + rng.uniform(0, 2 * np.pi))
        self.scale = scale
        self.pelvis = pelvis + np.stack([action["stride"] * scale * t, action["bob"] * scale * np.sin(2 * w * t)], 1)
        self._build_parts(rng)

    # --- appearance ------------------------------------------------------------------------
    def _build_parts(self, rng) -> None:
        import cv2

        u = self.unit
        lw = max(2, int(round(BODY["limb_w"] * u)))
        # garments (VIP classes); one texture per garment, shared by the parts that wear it
        r = rng.random(4)
        torso_id = (
            VIP["dress"]
            if r[0] < 0.15
            else VIP["jumpsuits"]
            if r[0] < 0.3
            else (VIP["coat"] if r[1] < 0.4 else VIP["upper_clothes"])
        )
        thigh_id = (
            torso_id
            if torso_id in (VIP["dress"], VIP["jumpsuits"])
            else (VIP["skirt"] if r[2] < 0.25 else VIP["pants"])
        )
        sleeve = r[3] < 0.5
        # one texture per garment, large enough for the largest sprite (torso / thigh capsule)
        tex_side = int(np.ceil(max(BODY["torso"], BODY["thigh"]) * u + 2 * lw)) + 16
        used = {
            VIP["face"],
            VIP["hair"],
            VIP["hat"],
            VIP["sunglasses"],
            VIP["scarf"],
            torso_id,
            thigh_id,
            VIP["glove"],
            VIP["socks"],
            VIP["left_arm"],
            VIP["left_leg"],
            VIP["left_shoe"],
        }
        textures = {
            lab: make_texture(rng, tex_side, tex_side, scale=max(u / 80, 0.3), palette=self.palette)
            for lab in sorted(used)
        }
        # left/right garments and skin share a texture (appearance does not tell the sides apart)
        for left, right in (("left_arm", "right_arm"), ("left_leg", "right_leg"), ("left_shoe", "right_shoe")):
            textures[VIP[right]] = textures[VIP[left]]

        def capsule(length: float, label_a: int, label_b: int | None = None) -> Sprite:
            L = max(2, int(round(length * u)))
            pad = lw // 2 + 2
            labels = np.zeros((lw + 2 * pad, L + lw + 2 * pad), np.uint8)
            mid = pad + lw / 2
            a, b = np.array([mid, mid]), np.array([mid + L, mid])
            cv2.line(labels, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), int(label_a), thickness=lw)
            if label_b is not None:  # lower part of the limb in another class (socks)
                labels[:, int(a[0] + 0.6 * L) :][labels[:, int(a[0] + 0.6 * L) :] > 0] = label_b
            return Sprite(_textured(rng, labels, textures), labels, a, b)

        def disc(radius: float, label: int, stretch: float = 1.0) -> Sprite:
            rad = max(1.5, radius * u)
            size = int(np.ceil(2 * rad * max(1.0, stretch))) + 4
            c = size / 2.0
            labels = np.zeros((size, size), np.uint8)
            cv2.ellipse(
                labels, (int(c), int(c)), (max(1, int(rad)), max(1, int(rad * stretch))), 0, 0, 360, int(label), -1
            )
            return Sprite(_textured(rng, labels, textures), labels, np.array([c, c]), np.array([c, c - rad]))

        # head: face with hair on top, optional hat and sunglasses (anchors: centre → crown)
        hr = max(2.0, BODY["head_r"] * u)
        size = int(np.ceil(2 * hr)) + 4
        c = size / 2.0
        labels = np.zeros((size, size), np.uint8)
        cv2.circle(labels, (int(c), int(c)), int(hr), VIP["face"], -1)
        yy = np.arange(size)[:, None].repeat(size, 1)
        top = (labels > 0) & (yy < c - 0.3 * hr)
        labels[top] = VIP["hat"] if rng.random() < 0.25 else VIP["hair"]
        if rng.random() < 0.25:
            band = (labels == VIP["face"]) & (np.abs(yy - (c - 0.05 * hr)) < 0.15 * hr)
            labels[band] = VIP["sunglasses"]
        head = Sprite(_textured(rng, labels, textures), labels, np.array([c, c]), np.array([c, c - hr]))

        # torso: trapezoid from the shoulders (neck) to the hips (pelvis), optional scarf
        sw, hw, th = BODY["shoulder"] * u, BODY["hip"] * u * 1.3, BODY["torso"] * u
        width = int(np.ceil(2 * sw + lw)) + 4
        height = int(np.ceil(th)) + 4
        cx = width / 2.0
        labels = np.zeros((height, width), np.uint8)
        poly = np.array(
            [[cx - sw - lw / 2, 2], [cx + sw + lw / 2, 2], [cx + hw + lw / 2, 2 + th], [cx - hw - lw / 2, 2 + th]]
        )
        cv2.fillPoly(labels, [np.round(poly * 16).astype(np.int32)], torso_id, shift=4)
        if rng.random() < 0.25:
            collar = labels[: max(2, int(0.12 * th)) + 2]  # a view: writes go to labels
            collar[collar > 0] = VIP["scarf"]
        torso = Sprite(_textured(rng, labels, textures), labels, np.array([cx, 2.0]), np.array([cx, 2.0 + th]))

        glove = rng.random() < 0.3
        socks = rng.random() < 0.15
        self.parts = {"head": head, "torso": torso}
        for side, arm, leg, shoe in (
            ("r", "right_arm", "right_leg", "right_shoe"),
            ("l", "left_arm", "left_leg", "left_shoe"),
        ):
            self.parts[f"{side}_upper_arm"] = capsule(BODY["upper_arm"], torso_id if sleeve else VIP[arm])
            self.parts[f"{side}_forearm"] = capsule(BODY["forearm"], VIP[arm])
            self.parts[f"{side}_hand"] = disc(BODY["hand_r"], VIP["glove"] if glove else VIP[arm])
            self.parts[f"{side}_thigh"] = capsule(BODY["thigh"], thigh_id)
            self.parts[f"{side}_shin"] = capsule(BODY["shin"], VIP[leg], VIP["socks"] if socks else None)
            self.parts[f"{side}_foot"] = disc(BODY["foot_r"], VIP[shoe], stretch=0.6)

    # --- kinematics ------------------------------------------------------------------------
    def joints_all(self) -> np.ndarray:
        """(T, 15, 2) world coordinates of the JHMDB joints for every frame."""
        s = self.scale[:, None]
        up = np.stack([np.sin(self.lean), -np.cos(self.lean)], 1)  # pelvis → neck
        right = np.stack([np.cos(self.lean), np.sin(self.lean)], 1)  # body's left on +x
        P = self.pelvis
        N = P + up * BODY["torso"] * s
        out = np.zeros((len(P), len(JHMDB_JOINTS), 2))
        out[:, J["neck"]] = N
        out[:, J["belly"]] = P + up * BODY["torso"] * 0.4 * s
        out[:, J["face"]] = N + up * (BODY["neck"] + 0.5 * BODY["head_r"]) * s
        down = -up
        for k, side, sign in ((0, "right", 1.0), (1, "left", -1.0)):
            shoulder = N - sign * right * BODY["shoulder"] * s
            hip = P - sign * right * BODY["hip"] * s
            a = self.angles
            # the right side's positive angle points outward; the left side is mirrored
            d_upper = _rot(down, sign * a[:, 0 + k])
            elbow = shoulder + d_upper * BODY["upper_arm"] * s
            wrist = elbow + _rot(d_upper, sign * a[:, 2 + k]) * BODY["forearm"] * s
            d_thigh = _rot(down, sign * a[:, 4 + k])
            knee = hip + d_thigh * BODY["thigh"] * s
            ankle = knee + _rot(d_thigh, sign * a[:, 6 + k]) * BODY["shin"] * s
            for name, val in (
                ("shoulder", shoulder),
                ("hip", hip),
                ("elbow", elbow),
                ("wrist", wrist),
                ("knee", knee),
                ("ankle", ankle),
            ):
                out[:, J[f"{side}_{name}"]] = val
        return out

    def placements(self, t: int, joints: np.ndarray) -> list[tuple[Sprite, np.ndarray]]:
        """Sprites and their world 2x3 affines at frame ``t``, back to front."""
        jt = joints[t]
        s = self.scale[t]
        up = jt[J["neck"]] - jt[J["belly"]]
        up = up / max(np.hypot(*up), 1e-9)
        out = []

        def seg(part: str, A, B):
            out.append((self.parts[part], similarity(self.parts[part].a, self.parts[part].b, A, B)))

        def dot(part: str, A, direction, radius):
            d = direction / max(np.hypot(*direction), 1e-9)
            seg(part, A, A + d * radius * s)

        for side in ("l", "r"):
            full = "left" if side == "l" else "right"
            seg(f"{side}_thigh", jt[J[f"{full}_hip"]], jt[J[f"{full}_knee"]])
            seg(f"{side}_shin", jt[J[f"{full}_knee"]], jt[J[f"{full}_ankle"]])
            dot(f"{side}_foot", jt[J[f"{full}_ankle"]], up, BODY["foot_r"])
        neck = jt[J["neck"]]
        pelvis = neck - up * BODY["torso"] * s
        seg("torso", neck, pelvis)
        face = neck + up * (BODY["neck"] + 0.5 * BODY["head_r"]) * s
        dot("head", face + up * 0.5 * BODY["head_r"] * s, up, BODY["head_r"])
        for side in ("l", "r"):
            full = "left" if side == "l" else "right"
            seg(f"{side}_upper_arm", jt[J[f"{full}_shoulder"]], jt[J[f"{full}_elbow"]])
            seg(f"{side}_forearm", jt[J[f"{full}_elbow"]], jt[J[f"{full}_wrist"]])
            dot(f"{side}_hand", jt[J[f"{full}_wrist"]], up, BODY["hand_r"])
        return out


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


# ---------------------------------------------------------------------------------------------
# scenes


def _oscillation(rng, T: int, amplitude: float, t0: float = 0.0) -> np.ndarray:
    t = np.arange(T) + t0
    return amplitude * np.sin(rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))


class Scene:
    """Background canvas + moving camera + actors (each with a label lookup table)."""

    def __init__(self, rng, height: int, width: int, frames: int, camera_motion: float = 1.0):
        self.H, self.W, self.T = height, width, frames
        side = max(height, width)
        self.palette = scene_palette(rng)
        # the canvas margin covers the camera's pan, zoom and roll (reflected beyond it)
        margin = 1.25 + 0.35 * camera_motion
        self.canvas = make_texture(
            rng, int(margin * height) + 8, int(margin * width) + 8, scale=max(side / 128, 0.5), palette=self.palette
        )
        cy, cx = self.canvas.shape[0] / 2, self.canvas.shape[1] / 2
        t = np.arange(frames)
        pan = rng.uniform(-0.01, 0.01, 2) * camera_motion * side
        shake = 0.02 * side * camera_motion
        cam = np.stack(
            [cx + pan[0] * t + _oscillation(rng, frames, shake), cy + pan[1] * t + _oscillation(rng, frames, shake)], 1
        )
        zoom = rng.uniform(0.9, 1.1) * (1 + _oscillation(rng, frames, 0.06 * camera_motion))
        roll = rng.uniform(-0.1, 0.1) + _oscillation(rng, frames, 0.04 * camera_motion)
        self.cameras = []  # world (canvas) → frame, 2x3
        for k in range(frames):
            c, s = np.cos(roll[k]) * zoom[k], np.sin(roll[k]) * zoom[k]
            lin = np.array([[c, -s], [s, c]])
            self.cameras.append(np.hstack([lin, (np.array([width / 2, height / 2]) - lin @ cam[k])[:, None]]))
        self.world_center = np.array([cx, cy])
        self.actors: list[tuple[object, np.ndarray, np.ndarray | None]] = []

    def add(self, actor, lut: np.ndarray) -> None:
        joints = actor.joints_all() if isinstance(actor, Puppet) else None
        self.actors.append((actor, lut, joints))

    def reframe(self, F: np.ndarray) -> None:
        """Post-compose every camera with a frame-space 2x3 (used to keep a person in view)."""
        self.cameras = [compose(F, C) for C in self.cameras]

    def frame_joints(self, index: int) -> np.ndarray:
        """(T, 15, 2) 0-based frame coordinates of the joints of actor ``index``."""
        joints = self.actors[index][2]
        return np.stack([apply(self.cameras[t], joints[t]) for t in range(self.T)])

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        C = self.cameras[t]
        rgb = cv2.warpAffine(self.canvas, C, (self.W, self.H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        ids = np.zeros((self.H, self.W), np.uint8)
        for actor, lut, joints in self.actors:
            for sprite, M in actor.placements(t, joints):
                M = compose(C, M)
                # warp only the sprite's bounding box in the frame (sprites are small)
                h, w = sprite.labels.shape
                corners = apply(M, np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64))
                x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - 1, 0)
                x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, [self.W, self.H])
                if x1 <= x0 or y1 <= y0:
                    continue
                M = M - np.array([[0, 0, x0], [0, 0, y0]])
                lab = cv2.warpAffine(
                    sprite.labels,
                    M,
                    (x1 - x0, y1 - y0),
                    flags=cv2.INTER_NEAREST,
                    borderMode=cv2.BORDER_CONSTANT,
                    borderValue=0,
                )
                m = lab > 0
                if not m.any():
                    continue
                tex = cv2.warpAffine(
                    sprite.texture, M, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
                )
                rgb[y0:y1, x0:x1][m] = tex[m]
                ids[y0:y1, x0:x1][m] = lut[lab[m]]
        return rgb, ids


def _lut(value: int | None = None) -> np.ndarray:
    """Label lookup: None = identity (VIP part ids), else every label → ``value``."""
    if value is None:
        return np.arange(256, dtype=np.uint8)
    lut = np.full(256, value, np.uint8)
    lut[0] = 0
    return lut


def _moving_blob(rng, scene: Scene, radius: float, family: dict, spread: float, speed: float) -> RigidActor:
    T, side = scene.T, max(scene.H, scene.W)
    start = scene.world_center + rng.uniform(-1, 1, 2) * spread * np.array([scene.W, scene.H]) / 2
    v = rng.normal(0, 1, 2)
    v = v / max(np.hypot(*v), 1e-9) * speed * side * rng.uniform(0.3, 1.0)
    t = np.arange(T)[:, None]
    centers = start + v * t + np.stack([_oscillation(rng, T, 0.03 * side), _oscillation(rng, T, 0.03 * side)], 1)
    angles = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.08, 0.08) * np.arange(T)
    scales = 1 + _oscillation(rng, T, 0.15)
    return RigidActor(blob_sprite(rng, radius, family, scene.palette), centers, angles, scales)


def _moving_puppet(rng, scene: Scene, height_px: float, action: dict, spread: float, t0: float = 0.0) -> Puppet:
    T = scene.T
    unit = height_px / 0.9
    pelvis0 = scene.world_center + rng.uniform(-1, 1, 2) * spread * np.array([scene.W, scene.H]) / 2
    pelvis0 = pelvis0 + np.array([0, 0.1 * height_px])
    drift = rng.normal(0, 0.004, 2) * max(scene.H, scene.W)
    pelvis = pelvis0 + drift * np.arange(T)[:, None]
    scale = unit * (1 + _oscillation(rng, T, 0.08))
    return Puppet(rng, unit, T, pelvis, scale, action, t0=t0, palette=scene.palette)


def _random_family(rng, seed: int, n_families: int) -> dict:
    return blob_family(int(rng.integers(0, n_families)), seed)


N_BLOB_FAMILIES = 16


def video_scene(
    rng, seed: int, height: int, width: int, frames: int, n_objects: int, n_distractors: int, puppet_prob: float = 0.35
) -> tuple[Scene, list[int]]:
    """A generic moving scene; returns it and the actor indices of the ``n_objects`` objects.

    Objects and distractors are drawn from the same families and textures; the depth order is
    random, so objects occlude one another and are occluded by distractors.
    """
    scene = Scene(rng, height, width, frames)
    side = min(height, width)
    actors = []
    for k in range(n_objects + n_distractors):
        is_object = k < n_objects
        if rng.random() < puppet_prob:
            action = action_family(int(rng.integers(0, len(JHMDB_CLASSES))), seed)
            actor = _moving_puppet(
                rng,
                scene,
                side * rng.uniform(0.45, 0.8),
                action,
                spread=0.5 if is_object else 0.9,
                t0=rng.uniform(0, 20),
            )
        else:
            actor = _moving_blob(
                rng,
                scene,
                side * rng.uniform(0.1, 0.22),
                _random_family(rng, seed, N_BLOB_FAMILIES),
                spread=0.5 if is_object else 0.9,
                speed=0.015,
            )
        actors.append((actor, k + 1 if is_object else 0))
    for k in rng.permutation(len(actors)):
        actor, obj_id = actors[k]
        scene.add(actor, _lut(obj_id))
    return scene


# ---------------------------------------------------------------------------------------------
# file writers (fixed encoder settings)


def _write_image(path: Path, rgb: np.ndarray) -> None:
    """RGB frame as JPEG (quality ``JPEG_QUALITY``) or PNG, by the suffix of ``path``."""
    import cv2

    ext, params = (
        (".png", [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
        if path.suffix.lower() == ".png"
        else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    )
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError(f"image encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def _write_id_png(path: Path, ids: np.ndarray, palette: list[int] | None) -> None:
    """Indexed ("P", with ``palette``) or grey ("L") PNG of uint8 ids."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    if palette is not None:
        im.putpalette(palette)  # L → P, pixel values stay the ids
    im.save(path, format="PNG", optimize=False, compress_level=PNG_COMPRESSION)


def _write_mat(path: Path, variables: dict) -> None:
    """MAT-file v5 with a fixed header (scipy stamps the creation time, which breaks byte
    identity between runs)."""
    import scipy.io

    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=False, oned_as="column")
    data = bytearray(buf.getvalue())
    header = b"MATLAB 5.0 MAT-file, written by pipeline.data.synthetic"
    data[:116] = header.ljust(116, b" ")
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# datasets


def _settings(dataset: str, overrides: dict | None) -> dict:
    from pipeline.config import section_defaults

    return section_defaults("data", "synthetic", dataset, overrides=overrides or {})


def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def make_imagenet(out: Path, cfg: dict, seed: int) -> dict:
    """``train/<wnid>/<wnid>_<i>.JPEG``; class c = one shape family (blob or puppet action)."""
    size = cfg["size"]
    n_cls, per_cls = cfg["classes"], cfg["images_per_class"]
    bar = progress(total=n_cls * per_cls, desc="imagenet", unit="img")
    for c in range(n_cls):
        wnid = f"n{c:08d}"
        folder = out / "train" / wnid
        folder.mkdir(parents=True)
        is_puppet = c % 3 == 2  # every third family is a body family
        for i in range(per_cls):
            rng = _rng(seed, "imagenet", c, i)
            scene = Scene(rng, size, size, 1, camera_motion=0.0)
            n_distractors = int(rng.integers(0, 3))
            front = rng.random(n_distractors) < 0.3
            for k in range(n_distractors):
                if not front[k]:
                    scene.add(
                        _moving_blob(
                            rng,
                            scene,
                            size * rng.uniform(0.08, 0.16),
                            _random_family(rng, seed, N_BLOB_FAMILIES),
                            0.9,
                            0.0,
                        ),
                        _lut(0),
                    )
            if is_puppet:
                scene.add(
                    _moving_puppet(
                        rng,
                        scene,
                        size * rng.uniform(0.55, 0.85),
                        action_family(c, seed),
                        spread=0.3,
                        t0=rng.uniform(0, 50),
                    ),
                    _lut(1),
                )
            else:
                scene.add(
                    _moving_blob(rng, scene, size * rng.uniform(0.2, 0.32), blob_family(c, seed), 0.3, 0.0), _lut(1)
                )
            for k in range(n_distractors):
                if front[k]:
                    scene.add(
                        _moving_blob(
                            rng,
                            scene,
                            size * rng.uniform(0.06, 0.12),
                            _random_family(rng, seed, N_BLOB_FAMILIES),
                            0.9,
                            0.0,
                        ),
                        _lut(0),
                    )
            rgb, _ = scene.render(0)
            _write_image(folder / f"{wnid}_{i}.JPEG", rgb)
            bar.update()
    bar.close()
    return {"classes": n_cls, "images": n_cls * per_cls}


def make_videos(out: Path, cfg: dict, seed: int) -> dict:
    """``<video>/<frame:05d>.jpg`` frame folders of generic moving scenes."""
    H, W, T = cfg["height"], cfg["width"], cfg["frames"]
    out.mkdir(parents=True, exist_ok=True)
    for v in progress(range(cfg["count"]), desc="videos", unit="video"):
        rng = _rng(seed, "videos", v)
        scene = video_scene(rng, seed, H, W, T, int(rng.integers(1, 4)), int(rng.integers(0, 3)))
        folder = out / f"video_{v:04d}"
        folder.mkdir()
        for t in range(T):
            _write_image(folder / f"{t:05d}.jpg", scene.render(t)[0])
    return {"videos": cfg["count"], "frames": cfg["count"] * T}


def _visible_enough(ids: np.ndarray, obj_ids, min_pixels: int) -> bool:
    counts = np.bincount(ids.ravel(), minlength=256)
    return all(counts[k] >= min_pixels for k in obj_ids)


MAX_ATTEMPTS = 100


def make_davis(out: Path, cfg: dict, seed: int) -> dict:
    """DAVIS-2017 layout: JPEG frames, palette PNG object ids on every frame, val.txt, val list."""
    H, W, T, K = cfg["height"], cfg["width"], cfg["frames"], cfg["max_objects"]
    names = [f"seq-{i:03d}" for i in range(cfg["sequences"])]
    palette = pascal_palette()
    min_pixels = max(4, int(0.004 * H * W))
    n_objects = 0
    for i, seq in enumerate(progress(names, desc="davis", unit="seq")):
        k_objects = int(_rng(seed, "davis-count", i).integers(max(1, K - 1), K + 1))
        for attempt in range(MAX_ATTEMPTS):
            rng = _rng(seed, "davis", i, attempt)
            scene = video_scene(rng, seed, H, W, T, k_objects, int(rng.integers(1, 3)))
            first = scene.render(0)
            # every object must be in frame 0 (the reference cannot predict an unseen object)
            if _visible_enough(first[1], range(1, k_objects + 1), min_pixels):
                break
        else:
            raise RuntimeError(
                f"DAVIS sequence {seq}: could not place {k_objects} visible "
                f"objects in {MAX_ATTEMPTS} attempts; enlarge height/width"
            )
        img_dir = out / "JPEGImages" / "480p" / seq
        ann_dir = out / "Annotations" / "480p" / seq
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for t in range(T):
            rgb, ids = first if t == 0 else scene.render(t)
            _write_image(img_dir / f"{t:05d}.jpg", rgb)
            _write_id_png(ann_dir / f"{t:05d}.png", ids, palette)
        n_objects += k_objects
    sets = out / "ImageSets" / "2017"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("".join(f"{n}\n" for n in sorted(names)))
    write_vallist("davis", out, out / "davis_vallist_480_880.txt", names=sorted(names), prefix=".")
    return {"sequences": len(names), "frames": len(names) * T, "objects": n_objects}


def make_vip(out: Path, cfg: dict, seed: int) -> dict:
    """VIP layout: people (1-3, part ids 0-19) among distractors, grey class-id PNGs."""
    H, W, T = cfg["height"], cfg["width"], cfg["frames"]
    numbers = _rng(seed, "vip-names").choice(np.arange(1, 405 + cfg["videos"]), cfg["videos"], replace=False)
    names = [f"videos{int(n)}" for n in numbers]  # unsorted, like the reference list
    min_pixels = max(4, int(0.01 * H * W))
    for i, name in enumerate(progress(names, desc="vip", unit="video")):
        for attempt in range(MAX_ATTEMPTS):
            rng = _rng(seed, "vip", i, attempt)
            scene = Scene(rng, H, W, T)
            layers = ["person"] * int(rng.integers(1, 4)) + ["blob"] * int(rng.integers(0, 3))
            for li in rng.permutation(len(layers)):
                if layers[li] == "person":
                    action = action_family(int(rng.integers(0, len(JHMDB_CLASSES))), seed)
                    scene.add(
                        _moving_puppet(
                            rng, scene, min(H, W) * rng.uniform(0.6, 0.9), action, spread=0.6, t0=rng.uniform(0, 20)
                        ),
                        _lut(None),
                    )
                else:
                    scene.add(
                        _moving_blob(
                            rng,
                            scene,
                            min(H, W) * rng.uniform(0.08, 0.16),
                            _random_family(rng, seed, N_BLOB_FAMILIES),
                            0.9,
                            0.015,
                        ),
                        _lut(0),
                    )
            first = scene.render(0)
            if (first[1] > 0).sum() >= min_pixels:
                break
        else:
            raise RuntimeError(f"VIP video {name}: no visible person after {MAX_ATTEMPTS} attempts")
        img_dir = out / "Images" / name
        ann_dir = out / "Annotations" / "Category_ids" / name
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        for t in range(T):
            rgb, ids = first if t == 0 else scene.render(t)
            stem = f"{t + 1:012d}"
            _write_image(img_dir / f"{stem}.jpg", rgb)
            _write_id_png(ann_dir / f"{stem}.png", ids, None)
    write_vallist("vip", out, out / "vip_vallist.txt", names=names, prefix=".")
    return {"videos": len(names), "frames": len(names) * T}


def make_jhmdb(out: Path, cfg: dict, seed: int) -> dict:
    """JHMDB layout: one person per video doing its class's action; PNG frames, pos_img .mat."""
    H, W, T = cfg["height"], cfg["width"], cfg["frames"]
    classes = [JHMDB_CLASSES[c] if c < len(JHMDB_CLASSES) else f"action_{c}" for c in range(cfg["classes"])]
    margin = 0.06 * min(H, W)
    videos = []
    bar = progress(total=len(classes) * cfg["videos_per_class"], desc="jhmdb", unit="video")
    for c, cls in enumerate(classes):
        for i in range(cfg["videos_per_class"]):
            rng = _rng(seed, "jhmdb", c, i)
            scene = Scene(rng, H, W, T, camera_motion=0.5)
            person = _moving_puppet(
                rng,
                scene,
                min(H, W) * rng.uniform(0.7, 0.85),
                action_family(c, seed),
                spread=0.1,
                t0=rng.uniform(0, 20),
            )
            occluder = _moving_blob(
                rng, scene, min(H, W) * rng.uniform(0.08, 0.16), _random_family(rng, seed, N_BLOB_FAMILIES), 0.8, 0.02
            )
            # the distractor passes behind or in front of the person (occluding joints)
            layers = [(person, _lut(1)), (occluder, _lut(0))]
            for actor, lut in layers if rng.random() < 0.5 else layers[::-1]:
                scene.add(actor, lut)
            p_index = [a for a, _, _ in scene.actors].index(person)
            # keep every joint inside the frame: zoom out / recentre the camera if needed
            pts = scene.frame_joints(p_index).reshape(-1, 2)
            lo, hi = pts.min(0), pts.max(0)
            avail = np.array([W - 1, H - 1]) - 2 * margin
            f = min(1.0, *(avail / np.maximum(hi - lo, 1e-6)))
            centre = np.array([(W - 1) / 2, (H - 1) / 2]) - f * (lo + hi) / 2
            out_of_view = (lo < margin).any() or (hi > np.array([W - 1, H - 1]) - margin).any()
            if out_of_view:
                scene.reframe(np.array([[f, 0, centre[0]], [0, f, centre[1]]]))
            joints = scene.frame_joints(p_index)  # (T, 15, 2), 0-based
            joints = np.clip(joints, 0, [W - 1, H - 1])
            name = f"{cls}_synth_{i:02d}"
            img_dir = out / "Rename_Images" / cls / name
            img_dir.mkdir(parents=True)
            for t in range(T):
                _write_image(img_dir / f"{t + 1:05d}.png", scene.render(t)[0])
            mat_dir = out / "joint_positions" / cls / name
            mat_dir.mkdir(parents=True)
            pos_img = np.ascontiguousarray((joints + 1.0).transpose(2, 1, 0))  # (2, 15, T), 1-based
            scale = np.full((1, T), 1.0)
            _write_mat(mat_dir / "joint_positions.mat", {"pos_img": pos_img, "scale": scale})
            videos.append(f"{cls}/{name}")
            bar.update()
    bar.close()
    write_vallist("jhmdb", out, out / "jhmdb_vallist.txt", names=videos, prefix=".")
    return {"classes": len(classes), "videos": len(videos), "frames": len(videos) * T}


MAKERS = {"imagenet": make_imagenet, "videos": make_videos, "davis": make_davis, "vip": make_vip, "jhmdb": make_jhmdb}


def generate(dataset: str, out: str | os.PathLike, settings: dict | None = None, seed: int = 0) -> dict:
    """Write ``dataset`` to ``out`` atomically (temp folder + rename); return the manifest."""
    if dataset not in MAKERS:
        raise ValueError(f"unknown synthetic dataset {dataset!r}; one of {DATASETS}")
    cfg = _settings(dataset, settings)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        counts = MAKERS[dataset](tmp, cfg, seed)
        manifest = {
            "dataset": dataset,
            "seed": seed,
            "settings": cfg,
            "counts": counts,
            "generator": "pipeline.data.synthetic",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    LOG.info("wrote %s to %s: %s", dataset, out, counts)
    return manifest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.data.synthetic",
        description="Generate an embedded synthetic dataset in its official on-disk layout (deterministic per seed).",
    )
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--out", required=True, help="dataset root to create (replaced atomically)")
    ap.add_argument(
        "--settings",
        default=None,
        help="JSON (or a JSON/YAML file) of data.synthetic.<dataset>; missing keys take the schema defaults",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    setup_logging()
    import cv2

    cv2.setNumThreads(max(1, args.threads))  # OpenCV only; no torch in this stage
    generate(args.dataset, args.out, load_settings(args.settings), args.seed)


if __name__ == "__main__":
    main()
