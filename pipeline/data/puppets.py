"""Articulated puppets: people of textured limb capsules whose joints are the 15 JHMDB joints (in
the standard order) and whose parts carry the 20 VIP human-parsing classes; one action family
(limb-angle oscillators) per JHMDB class.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.data.readers import JHMDB_JOINTS, VIP_CLASSES
from pipeline.data.sprites import Sprite, make_texture, similarity, textured
from pipeline.seeding import derive_seed

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


def _garments(rng) -> tuple[int, int, bool]:
    """VIP classes of the torso and thigh garments, and whether the upper arms wear sleeves."""
    r = rng.random(4)
    torso_id = (
        VIP["dress"]
        if r[0] < 0.15
        else VIP["jumpsuits"]
        if r[0] < 0.3
        else (VIP["coat"] if r[1] < 0.4 else VIP["upper_clothes"])
    )
    thigh_id = (
        torso_id if torso_id in (VIP["dress"], VIP["jumpsuits"]) else (VIP["skirt"] if r[2] < 0.25 else VIP["pants"])
    )
    return torso_id, thigh_id, r[3] < 0.5


class Puppet:
    """A person of textured limb capsules; ``joints_all()`` follows JHMDB's 15-joint order.

    Sprites are built at ``unit`` pixels per body unit; the pose holds per-frame pelvis position
    (T, 2), ``scale`` (T,) in pixels per unit, ``lean`` (T,) and the 8 limb ``angles`` (T, 8).
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
    # Every part draws from ``rng`` in a fixed order (garments, textures, head, torso, limbs):
    # the order is part of the output, so the same seed gives the same bytes.
    def _build_parts(self, rng) -> None:
        self.limb_w = max(2, int(round(BODY["limb_w"] * self.unit)))
        torso_id, thigh_id, sleeve = _garments(rng)
        textures = self._garment_textures(rng, torso_id, thigh_id)
        head = self._head(rng, textures)
        torso = self._torso(rng, textures, torso_id)
        glove = rng.random() < 0.3
        socks = rng.random() < 0.15
        self.parts = {"head": head, "torso": torso}
        for side, arm, leg, shoe in (
            ("r", "right_arm", "right_leg", "right_shoe"),
            ("l", "left_arm", "left_leg", "left_shoe"),
        ):
            self.parts[f"{side}_upper_arm"] = self._capsule(
                rng, textures, BODY["upper_arm"], torso_id if sleeve else VIP[arm]
            )
            self.parts[f"{side}_forearm"] = self._capsule(rng, textures, BODY["forearm"], VIP[arm])
            self.parts[f"{side}_hand"] = self._disc(rng, textures, BODY["hand_r"], VIP["glove"] if glove else VIP[arm])
            self.parts[f"{side}_thigh"] = self._capsule(rng, textures, BODY["thigh"], thigh_id)
            self.parts[f"{side}_shin"] = self._capsule(
                rng, textures, BODY["shin"], VIP[leg], VIP["socks"] if socks else None
            )
            self.parts[f"{side}_foot"] = self._disc(rng, textures, BODY["foot_r"], VIP[shoe], stretch=0.6)

    def _garment_textures(self, rng, torso_id: int, thigh_id: int) -> dict[int, np.ndarray]:
        """One texture per garment (VIP class), shared by the parts that wear it."""
        u, lw = self.unit, self.limb_w
        # large enough for the largest sprite (torso / thigh capsule)
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
        return textures

    def _capsule(self, rng, textures: dict, length: float, label_a: int, label_b: int | None = None) -> Sprite:
        """A limb segment of ``length`` body units (anchors: the two joint ends)."""
        lw = self.limb_w
        L = max(2, int(round(length * self.unit)))
        pad = lw // 2 + 2
        labels = np.zeros((lw + 2 * pad, L + lw + 2 * pad), np.uint8)
        mid = pad + lw / 2
        a, b = np.array([mid, mid]), np.array([mid + L, mid])
        cv2.line(labels, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), int(label_a), thickness=lw)
        if label_b is not None:  # lower part of the limb in another class (socks)
            labels[:, int(a[0] + 0.6 * L) :][labels[:, int(a[0] + 0.6 * L) :] > 0] = label_b
        return Sprite(textured(rng, labels, textures), labels, a, b)

    def _disc(self, rng, textures: dict, radius: float, label: int, stretch: float = 1.0) -> Sprite:
        """A hand or foot of ``radius`` body units (anchors: centre → top)."""
        rad = max(1.5, radius * self.unit)
        size = int(np.ceil(2 * rad * max(1.0, stretch))) + 4
        c = size / 2.0
        labels = np.zeros((size, size), np.uint8)
        cv2.ellipse(labels, (int(c), int(c)), (max(1, int(rad)), max(1, int(rad * stretch))), 0, 0, 360, int(label), -1)
        return Sprite(textured(rng, labels, textures), labels, np.array([c, c]), np.array([c, c - rad]))

    def _head(self, rng, textures: dict) -> Sprite:
        """Face with hair on top, optional hat and sunglasses (anchors: centre → crown)."""
        hr = max(2.0, BODY["head_r"] * self.unit)
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
        return Sprite(textured(rng, labels, textures), labels, np.array([c, c]), np.array([c, c - hr]))

    def _torso(self, rng, textures: dict, torso_id: int) -> Sprite:
        """Trapezoid from the shoulders (neck) to the hips (pelvis), optional scarf."""
        u, lw = self.unit, self.limb_w
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
        return Sprite(textured(rng, labels, textures), labels, np.array([cx, 2.0]), np.array([cx, 2.0 + th]))

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
