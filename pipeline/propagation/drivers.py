"""Per-dataset drivers of label propagation: frame-0 labels, prediction files, scoring (spec §3).

Each driver turns a dataset root into :class:`Video` s whose callbacks build frame 0's grid labels
and write every frame's prediction in the standard result layout of its scorer, so
``pipeline.propagation.score`` reads them like any other method's results folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.data.readers import JHMDB_JOINTS, DavisDataset, JhmdbDataset, VipDataset
from pipeline.imaging import pil_nearest
from pipeline.io import atomic_path, write_csv_atomic
from pipeline.palette import pascal_palette
from pipeline.propagation import score
from pipeline.propagation.algorithm import (
    jhmdb_heatmaps,
    keypoints_readout,
    segmentation_labels,
    segmentation_readout,
)
from pipeline.propagation.figures import blend, class_colors
from pipeline.propagation.settings import PropagationSettings, Video
from pipeline.registry import Registry
from pipeline.runtime import LOG

# dataset -> driver(root, out_dir, protocol, names) -> list[Video]
WRITERS = Registry("propagation dataset")


def write_png(path: Path, ids: np.ndarray, palette: np.ndarray | None = None) -> None:
    """(H, W) ids as a grey PNG, or an indexed one with ``palette`` (256, 3); written atomically."""
    im = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8), mode="L")
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette.ravel().tolist())
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp, format="PNG")


def _first_segmentation(gt: np.ndarray, hw, grid, state: dict, protocol: PropagationSettings) -> np.ndarray:
    """Frame-0 GT ids -> grid labels of its label set; keeps ids and label set in ``state``."""
    ids = cv2.resize(gt, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    state["label_set"] = np.unique(ids).tolist()
    state["hw"], state["first_ids"] = hw, ids
    return segmentation_labels(ids, state["label_set"], grid, protocol.label_downsample)


@WRITERS.register("davis")
def davis_videos(root, out_dir: Path, protocol: PropagationSettings, names=None) -> list[Video]:
    """DAVIS-2017: indexed palette PNGs ``<seq>/<frame stem>.png``.

    Sizes: with ``gt_mode="resized"`` the scorer compares against GT nearest-resized to the input
    size (the reference's DAVIS_480_880 copy), so predictions stay at the input size; with
    ``"native"`` they are nearest-resized (OpenCV, as ``convert_davis.py``) to the size of the
    sequence's frame-0 annotation.
    """
    ds = DavisDataset(root, sequences=names)
    palette = np.asarray(pascal_palette(), np.uint8).reshape(256, 3)
    videos = []
    for seq in ds.sequences:
        frames, annotations = ds.frames(seq), ds.annotations(seq)
        state: dict = {}

        def first_labels(rgb0, hw, grid, annotations=annotations, state=state):
            gt = ds.read_annotation(annotations[0])
            if gt.shape != rgb0.shape[:2]:
                raise ValueError(f"{annotations[0]}: annotation size {gt.shape} != frame size {rgb0.shape[:2]}")
            state["gt_hw"] = gt.shape
            return _first_segmentation(gt, hw, grid, state, protocol)

        def on_frame(t, soft, seq=seq, frames=frames, state=state):
            out_hw = state["hw"] if protocol.gt_mode == "resized" else state["gt_hw"]
            ids = segmentation_readout(soft, state["hw"], state["label_set"], out_hw)
            if t in state.get("keep", ()):
                state.setdefault("ids", {})[t] = ids
            write_png(out_dir / seq / f"{frames[t].stem}.png", ids, palette)

        def overlay(t, img, state=state):
            ids = state["first_ids"] if t == 0 else state["ids"][t]
            return blend(
                img, cv2.resize(ids, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST), palette
            ), None

        videos.append(Video(seq, frames, first_labels, on_frame, lambda: None, overlay, state))
    return videos


@WRITERS.register("vip")
def vip_videos(root, out_dir: Path, protocol: PropagationSettings, names=None) -> list[Video]:
    """VIP: grey class-id PNGs ``videos<N>/<frame stem>.png`` at the GT size (PIL nearest)."""
    ds = VipDataset(root, videos=names)
    colors = class_colors(20)
    videos = []
    for name in ds.videos:
        frames, annotations = ds.frames(name), ds.annotations(name)
        gt_by_stem = {p.stem: p for p in annotations}
        state: dict = {}

        def first_labels(rgb0, hw, grid, annotations=annotations, state=state):
            return _first_segmentation(ds.read_annotation(annotations[0]), hw, grid, state, protocol)

        def on_frame(t, soft, name=name, frames=frames, state=state, gt_by_stem=gt_by_stem):
            ids = segmentation_readout(soft, state["hw"], state["label_set"])
            if t in state.get("keep", ()):
                state.setdefault("ids", {})[t] = ids
            gt_path = gt_by_stem.get(frames[t].stem)
            if gt_path is None:  # unannotated frame: nothing to score, keep the input size
                out = ids
            else:  # PIL nearest, as the reference VIP scorer resizes predictions
                with Image.open(gt_path) as im:
                    out = pil_nearest(ids, (im.height, im.width))
            write_png(out_dir / name / f"{frames[t].stem}.png", out)

        def overlay(t, img, state=state):
            ids = state["first_ids"] if t == 0 else state["ids"][t]
            return blend(img, ids, colors), None

        videos.append(Video(name, frames, first_labels, on_frame, lambda: None, overlay, state))
    return videos


@WRITERS.register("jhmdb")
def jhmdb_videos(root, out_dir: Path, protocol: PropagationSettings, names=None) -> list[Video]:
    """JHMDB: ``<class>/<video>/joint_positions.mat`` with ``pos_img`` (2, 15, T), 1-based pixels of
    the original frames; a joint that cannot be placed (all-zero map) is NaN."""
    ds = JhmdbDataset(root, split_list=names)
    videos = []
    for name in ds.videos:
        frames = ds.frames(name)
        state: dict = {"coords": {}}

        def first_labels(rgb0, hw, grid, name=name, state=state):
            pos = ds.read_joints(name)
            ori_h, ori_w = rgb0.shape[:2]
            patch = hw[0] // grid[0]
            joints = pos[:, :, 0] - 1  # 0-based pixels -> grid units, as the reference
            joints = np.stack([joints[0] * hw[1] / ori_w / patch, joints[1] * hw[0] / ori_h / patch])
            state.update(grid=grid, orig_hw=(ori_h, ori_w), n_gt=pos.shape[2])
            return jhmdb_heatmaps(joints, grid, protocol.sigma)

        def on_frame(t, soft, state=state):
            state["coords"][t] = keypoints_readout(soft, state["grid"], protocol.readout_topk).numpy()

        def finish(name=name, frames=frames, state=state):
            _write_jhmdb_positions(out_dir / name / "joint_positions.mat", name, len(frames), state)

        def overlay(t, img, state=state):
            return img, _jhmdb_overlay_points(state["coords"][t], state["grid"], img.shape[:2])

        videos.append(Video(name, frames, first_labels, on_frame, finish, overlay, state))
    return videos


def _write_jhmdb_positions(path: Path, name: str, n_frames: int, state: dict) -> None:
    """The read-out grid coordinates of every frame -> ``pos_img`` in 1-based original pixels."""
    grid, (ori_h, ori_w) = state["grid"], state["orig_hw"]
    n_gt = state["n_gt"]
    if n_gt != n_frames:
        LOG.warning(
            "%s: %d frames but pos_img has %d; writing %d (NaN past the last frame)", name, n_frames, n_gt, n_gt
        )
    coords = np.full((2, len(JHMDB_JOINTS), n_gt), -1.0)  # grid units, -1 = not placed
    for t in range(min(n_gt, n_frames)):
        coords[..., t] = state["coords"][t]
    pos = np.empty_like(coords)
    # grid units -> 0-based original pixels (the reference scorer's x * W / feat_res with
    # feat_res = the grid, not a hard-coded 20), then 1-based like pos_img
    pos[0] = coords[0] * ori_w / grid[1] + 1
    pos[1] = coords[1] * ori_h / grid[0] + 1
    pos[:, (coords < 0).any(0)] = np.nan
    import scipy.io  # noqa: PLC0415  (JHMDB's writer only: 0.3 s of imports for the other datasets' jobs)

    with atomic_path(path, suffix=".mat") as tmp, open(tmp, "wb") as fh:
        scipy.io.savemat(fh, {"pos_img": pos})


def _jhmdb_overlay_points(coords: np.ndarray, grid: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(2, J) grid coordinates -> pixel points of the figure image; NaN where not placed."""
    xy = coords.astype(np.float64)
    # same mapping as the scored positions (cell index x patch, no +0.5)
    pts = np.stack([xy[0] * image_hw[1] / grid[1], xy[1] * image_hw[0] / grid[0]])
    pts[:, (xy < 0).any(0)] = np.nan
    return pts


def score_predictions(
    dataset: str, root: Path, pred_dir: Path, scores_dir: Path, protocol: PropagationSettings, names: Sequence[str]
) -> dict[str, float]:
    """Score ``pred_dir`` with ``pipeline.propagation.score`` into a fresh ``scores_dir``; headline metrics in %.

    The scorers' own CSVs (DAVIS per-sequence/per-object, VIP per-class, JHMDB per-joint) stay in
    ``scores_dir``.
    """
    if scores_dir.exists():  # never let an earlier run's CSVs stand in for this one's
        shutil.rmtree(scores_dir)
    if dataset == "davis":
        if protocol.gt_mode == "resized" and len(protocol.size) != 2:
            raise ValueError("propagation.davis.gt_mode 'resized' needs a two-value size (H, W)")
        res = score.davis_scores(
            root,
            pred_dir,
            scores_dir,
            gt_mode=protocol.gt_mode,
            size=protocol.size if protocol.gt_mode == "resized" else None,
            sequences=names,
        )
        write_csv_atomic(res["per_object"], scores_dir / "per-object_results-val.csv")
        glob = res["global"].iloc[0]
        return {k: 100 * float(glob[k]) for k in ("J&F-Mean", "J-Mean", "F-Mean")}
    if dataset == "vip":
        res = score.vip_scores(root, pred_dir, scores_dir, videos=names)
        return {"mIoU": 100 * float(res["miou"])}
    res = score.jhmdb_scores(root, pred_dir, scores_dir)
    pck = res["pck"].set_index("alpha")["PCK"]
    return {"PCK@0.1": float(pck.loc[0.1]), "PCK@0.2": float(pck.loc[0.2])}
