"""Deterministic generator of the embedded synthetic datasets, in the official on-disk layouts.

``python -m pipeline.data synthetic --dataset {imagenet,videos,davis,vip,jhmdb} --out DIR
--settings JSON --seed S [--threads T]``

Every dataset is drawn from one scene distribution, so pretraining on the stills transfers to the
videos:

- textures (``pipeline.data.sprites``): smooth multi-scale noise plus an oriented grating, mapped through a ramp of 3-4
  colours; every texture of a scene (background and objects alike) draws its colours from one
  per-scene palette, so raw pixel colour does not separate an object from the background or from
  another object — they differ in pattern (scale, orientation, colour order) and position
  (colour 1-NN propagation from frame 0 scores J ≈ 0.35 on the default DAVIS stand-in, barely
  above copying the first mask, ≈ 0.25);
- objects: textured blobs (lobed shapes, some with holes) and articulated "puppets"
  (``pipeline.data.puppets``) — people made
  of textured limb capsules whose joints are the 15 JHMDB joints (in the standard order) and whose
  parts carry the 20 VIP human-parsing classes;
- motion (``pipeline.data.scenes``): object translation, rotation and scaling, limb articulation (one action family per
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
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from pipeline.config import load_settings, section_defaults
from pipeline.data.puppets import JHMDB_CLASSES, action_family
from pipeline.data.scenes import (
    N_BLOB_FAMILIES,
    Scene,
    label_lut,
    moving_blob,
    moving_puppet,
    random_family,
    video_scene,
)
from pipeline.data.sprites import RigidActor, blob_family
from pipeline.data.vallists import write_vallist
from pipeline.palette import pascal_palette
from pipeline.registry import Registry
from pipeline.runtime import progress, setup_logging
from pipeline.seeding import derive_seed

LOG = logging.getLogger("cdgmae.synthetic")

JPEG_QUALITY = 90  # fixed encoder settings: same pixels → same bytes
PNG_COMPRESSION = 3


# ---------------------------------------------------------------------------------------------
# file writers (fixed encoder settings)


def _write_image(path: Path, rgb: np.ndarray) -> None:
    """RGB frame as JPEG (quality ``JPEG_QUALITY``) or PNG, by the suffix of ``path``."""
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
    im = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    if palette is not None:
        im.putpalette(palette)  # L → P, pixel values stay the ids
    im.save(path, format="PNG", optimize=False, compress_level=PNG_COMPRESSION)


def _write_mat(path: Path, variables: dict) -> None:
    """MAT-file v5 with a fixed header (scipy stamps the creation time, which breaks byte
    identity between runs)."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=False, oned_as="column")
    data = bytearray(buf.getvalue())
    header = b"MATLAB 5.0 MAT-file, written by pipeline.data.synthetic"
    data[:116] = header.ljust(116, b" ")
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# datasets


def _settings(dataset: str, overrides: dict | None) -> dict:
    return section_defaults("data", "synthetic", dataset, overrides=overrides or {})


def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


# dataset name (a key of data.synthetic) -> maker(out, cfg, seed) -> counts
MAKERS = Registry("data.synthetic")


def _still_distractor(rng, scene: Scene, radius: float, seed: int) -> RigidActor:
    return moving_blob(rng, scene, radius, random_family(rng, seed, N_BLOB_FAMILIES), 0.9, 0.0)


def _imagenet_still(rng, size: int, c: int, seed: int) -> np.ndarray:
    """One still of class ``c``: its family's object among distractors behind and in front."""
    scene = Scene(rng, size, size, 1, camera_motion=0.0)
    n_distractors = int(rng.integers(0, 3))
    front = rng.random(n_distractors) < 0.3
    for k in range(n_distractors):
        if not front[k]:
            scene.add(_still_distractor(rng, scene, size * rng.uniform(0.08, 0.16), seed), label_lut(0))
    if c % 3 == 2:  # every third family is a body family
        height = size * rng.uniform(0.55, 0.85)
        actor = moving_puppet(rng, scene, height, action_family(c, seed), spread=0.3, t0=rng.uniform(0, 50))
    else:
        actor = moving_blob(rng, scene, size * rng.uniform(0.2, 0.32), blob_family(c, seed), 0.3, 0.0)
    scene.add(actor, label_lut(1))
    for k in range(n_distractors):
        if front[k]:
            scene.add(_still_distractor(rng, scene, size * rng.uniform(0.06, 0.12), seed), label_lut(0))
    return scene.render(0)[0]


@MAKERS.register("imagenet")
def make_imagenet(out: Path, cfg: dict, seed: int) -> dict:
    """``train/<wnid>/<wnid>_<i>.JPEG``; class c = one shape family (blob or puppet action)."""
    size = cfg["size"]
    n_cls, per_cls = cfg["classes"], cfg["images_per_class"]
    bar = progress(total=n_cls * per_cls, desc="imagenet", unit="img")
    for c in range(n_cls):
        wnid = f"n{c:08d}"
        folder = out / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_cls):
            _write_image(folder / f"{wnid}_{i}.JPEG", _imagenet_still(_rng(seed, "imagenet", c, i), size, c, seed))
            bar.update()
    bar.close()
    return {"classes": n_cls, "images": n_cls * per_cls}


@MAKERS.register("videos")
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


@MAKERS.register("davis")
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


def _vip_scene(rng, H: int, W: int, T: int, seed: int) -> Scene:
    """1-3 people (part ids as labels) and 0-2 unannotated blobs, in a random depth order."""
    scene = Scene(rng, H, W, T)
    layers = ["person"] * int(rng.integers(1, 4)) + ["blob"] * int(rng.integers(0, 3))
    for li in rng.permutation(len(layers)):
        if layers[li] == "person":
            action = action_family(int(rng.integers(0, len(JHMDB_CLASSES))), seed)
            height = min(H, W) * rng.uniform(0.6, 0.9)
            scene.add(moving_puppet(rng, scene, height, action, spread=0.6, t0=rng.uniform(0, 20)), label_lut(None))
        else:
            radius = min(H, W) * rng.uniform(0.08, 0.16)
            family = random_family(rng, seed, N_BLOB_FAMILIES)
            scene.add(moving_blob(rng, scene, radius, family, 0.9, 0.015), label_lut(0))
    return scene


@MAKERS.register("vip")
def make_vip(out: Path, cfg: dict, seed: int) -> dict:
    """VIP layout: people (1-3, part ids 0-19) among distractors, grey class-id PNGs."""
    H, W, T = cfg["height"], cfg["width"], cfg["frames"]
    numbers = _rng(seed, "vip-names").choice(np.arange(1, 405 + cfg["videos"]), cfg["videos"], replace=False)
    names = [f"videos{int(n)}" for n in numbers]  # unsorted, like the reference list
    min_pixels = max(4, int(0.01 * H * W))
    for i, name in enumerate(progress(names, desc="vip", unit="video")):
        for attempt in range(MAX_ATTEMPTS):
            scene = _vip_scene(_rng(seed, "vip", i, attempt), H, W, T, seed)
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


def _jhmdb_scene(rng, H: int, W: int, T: int, c: int, seed: int) -> tuple[Scene, np.ndarray]:
    """One person doing class ``c``'s action and one occluder; the scene and the person's
    (T, 15, 2) 0-based joints, all inside the frame."""
    scene = Scene(rng, H, W, T, camera_motion=0.5)
    height = min(H, W) * rng.uniform(0.7, 0.85)
    person = moving_puppet(rng, scene, height, action_family(c, seed), spread=0.1, t0=rng.uniform(0, 20))
    radius = min(H, W) * rng.uniform(0.08, 0.16)
    occluder = moving_blob(rng, scene, radius, random_family(rng, seed, N_BLOB_FAMILIES), 0.8, 0.02)
    # the distractor passes behind or in front of the person (occluding joints)
    layers = [(person, label_lut(1)), (occluder, label_lut(0))]
    for actor, lut in layers if rng.random() < 0.5 else layers[::-1]:
        scene.add(actor, lut)
    p_index = [a for a, _, _ in scene.actors].index(person)
    # keep every joint inside the frame: zoom out / recentre the camera if needed
    margin = 0.06 * min(H, W)
    pts = scene.frame_joints(p_index).reshape(-1, 2)
    lo, hi = pts.min(0), pts.max(0)
    avail = np.array([W - 1, H - 1]) - 2 * margin
    f = min(1.0, *(avail / np.maximum(hi - lo, 1e-6)))
    centre = np.array([(W - 1) / 2, (H - 1) / 2]) - f * (lo + hi) / 2
    out_of_view = (lo < margin).any() or (hi > np.array([W - 1, H - 1]) - margin).any()
    if out_of_view:
        scene.reframe(np.array([[f, 0, centre[0]], [0, f, centre[1]]]))
    joints = scene.frame_joints(p_index)  # (T, 15, 2), 0-based
    return scene, np.clip(joints, 0, [W - 1, H - 1])


@MAKERS.register("jhmdb")
def make_jhmdb(out: Path, cfg: dict, seed: int) -> dict:
    """JHMDB layout: one person per video doing its class's action; PNG frames, pos_img .mat."""
    H, W, T = cfg["height"], cfg["width"], cfg["frames"]
    classes = [JHMDB_CLASSES[c] if c < len(JHMDB_CLASSES) else f"action_{c}" for c in range(cfg["classes"])]
    videos = []
    bar = progress(total=len(classes) * cfg["videos_per_class"], desc="jhmdb", unit="video")
    for c, cls in enumerate(classes):
        for i in range(cfg["videos_per_class"]):
            scene, joints = _jhmdb_scene(_rng(seed, "jhmdb", c, i), H, W, T, c, seed)
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


DATASETS = tuple(MAKERS)  # imagenet, videos, davis, vip, jhmdb


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
        prog="python -m pipeline.data synthetic",
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
    cv2.setNumThreads(max(1, args.threads))  # OpenCV only; no torch in this stage
    generate(args.dataset, args.out, load_settings(args.settings), args.seed)
