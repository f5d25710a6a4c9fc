"""Scenes: a textured background canvas seen by a moving camera, with actors (rigid blobs and
articulated puppets) drawn back to front; ``render(t)`` gives frame ``t`` and its label ids.

Motion: object translation, rotation and scaling, limb articulation, occlusion by other objects
and by unannotated distractors, and camera pan, zoom and roll over a canvas larger than the frame.
Every texture of a scene draws its colours from one per-scene palette.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.data.puppets import JHMDB_CLASSES, Puppet, action_family
from pipeline.data.sprites import RigidActor, apply, blob_family, blob_sprite, compose, make_texture, scene_palette

N_BLOB_FAMILIES = 16  # blob families drawn from for distractors and generic objects


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


def label_lut(value: int | None = None) -> np.ndarray:
    """Label lookup: None = identity (VIP part ids), else every label → ``value``."""
    if value is None:
        return np.arange(256, dtype=np.uint8)
    lut = np.full(256, value, np.uint8)
    lut[0] = 0
    return lut


def moving_blob(rng, scene: Scene, radius: float, family: dict, spread: float, speed: float) -> RigidActor:
    """A blob of ``family`` placed within ``spread`` of the centre, drifting at ``speed`` (frame sides per frame)."""
    T, side = scene.T, max(scene.H, scene.W)
    start = scene.world_center + rng.uniform(-1, 1, 2) * spread * np.array([scene.W, scene.H]) / 2
    v = rng.normal(0, 1, 2)
    v = v / max(np.hypot(*v), 1e-9) * speed * side * rng.uniform(0.3, 1.0)
    t = np.arange(T)[:, None]
    centers = start + v * t + np.stack([_oscillation(rng, T, 0.03 * side), _oscillation(rng, T, 0.03 * side)], 1)
    angles = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.08, 0.08) * np.arange(T)
    scales = 1 + _oscillation(rng, T, 0.15)
    return RigidActor(blob_sprite(rng, radius, family, scene.palette), centers, angles, scales)


def moving_puppet(rng, scene: Scene, height_px: float, action: dict, spread: float, t0: float = 0.0) -> Puppet:
    """A person ``height_px`` tall doing ``action`` from time ``t0``, placed within ``spread`` of the centre."""
    T = scene.T
    unit = height_px / 0.9
    pelvis0 = scene.world_center + rng.uniform(-1, 1, 2) * spread * np.array([scene.W, scene.H]) / 2
    pelvis0 = pelvis0 + np.array([0, 0.1 * height_px])
    drift = rng.normal(0, 0.004, 2) * max(scene.H, scene.W)
    pelvis = pelvis0 + drift * np.arange(T)[:, None]
    scale = unit * (1 + _oscillation(rng, T, 0.08))
    return Puppet(rng, unit, T, pelvis, scale, action, t0=t0, palette=scene.palette)


def random_family(rng, seed: int, n_families: int) -> dict:
    """One of the first ``n_families`` blob families, drawn with ``rng``."""
    return blob_family(int(rng.integers(0, n_families)), seed)


def video_scene(
    rng, seed: int, height: int, width: int, frames: int, n_objects: int, n_distractors: int, puppet_prob: float = 0.35
) -> Scene:
    """A generic moving scene of ``n_objects`` objects (label ids 1..n) and unannotated distractors.

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
            actor = moving_puppet(
                rng,
                scene,
                side * rng.uniform(0.45, 0.8),
                action,
                spread=0.5 if is_object else 0.9,
                t0=rng.uniform(0, 20),
            )
        else:
            actor = moving_blob(
                rng,
                scene,
                side * rng.uniform(0.1, 0.22),
                random_family(rng, seed, N_BLOB_FAMILIES),
                spread=0.5 if is_object else 0.9,
                speed=0.015,
            )
        actors.append((actor, k + 1 if is_object else 0))
    for k in rng.permutation(len(actors)):
        actor, obj_id = actors[k]
        scene.add(actor, label_lut(obj_id))
    return scene
