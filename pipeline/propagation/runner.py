"""Stage 4: training-free label propagation (DAVIS-2017 / VIP / JHMDB), reference protocol.

The protocol is CropMAE's evaluation (itself videowalk's, ``downstreams/propagation``), digested in
``/work/shared/spec/propagation-eval.md`` §1; the numbers only match the published ones when every
detail matches, so the quirks are reproduced and named here:

* frames: OpenCV read, RGB, /255, OpenCV bilinear resize (no antialias), ImageNet normalisation;
  a two-value size is a fixed (H, W), a one-value size is the long side with the short side floored
  to a multiple of 64 (VIP);
* features: the encoder's final-norm patch tokens (``ViTEncoder.dense_features``), L2-normalised over
  channels; the grid is always input size / patch size (ViT-S/8 works);
* context for query frame t: frame 0 as the long-term slot (never radius-restricted) plus ``queue``
  short-term slots holding real frames max(0, t - queue) ... t - 1 — the reference prepends ``queue``
  copies of frame 0 to the video, so frame 0 fills (queue + 2 - t) slots for 1 <= t <= queue and the
  duplicates are separate keys (multiset top-k);
* affinity = dot products; short-term slots get -1e10 outside a Euclidean radius (strictly less, in
  grid cells); logits / temperature; top-k over all context keys; softmax over the k logits;
  prediction = weighted sum of the keys' **soft** labels; frame 0's prediction is its own label map;
* labels: DAVIS/VIP one-hot of the frame-0 label set at input resolution, resized to the grid with
  OpenCV bilinear (a point sample at the patch centre: ``label_downsample="bilinear"``, the
  reference); JHMDB 15 Gaussian heatmaps (sigma 0.5 cell, 4x4 stamp) plus a background channel;
* read-out: OpenCV bilinear upsample to the input size, argmax, ids, nearest resize to the GT size;
  JHMDB: weighted mean of the top-5 cells per joint.

Speed/memory (spec §4): features are computed once per real frame and stay on the device; for each
query frame one affinity product against the stacked unique context frames, a precomputed boolean
radius mask, and frame 0's masked logits reused (top-k of them repeated) for its duplicate slots, so
the multiset top-k equals the reference's without a host key bank or padded duplicate forwards.
``propagate_reference`` keeps the reference's straightforward algorithm (host key bank with padded
duplicates, per-chunk gathers) for the equivalence tests and the benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import constants
from pipeline.config import load_settings, section_defaults
from pipeline.devices import resolve_device, set_threads
from pipeline.imaging import pil_nearest
from pipeline.io import atomic_path, file_sha256, write_csv_atomic, write_text_atomic
from pipeline.runtime import LOG, progress, setup_logging

DATASETS = ("davis", "vip", "jhmdb")
IMAGENET_MEAN = np.asarray(constants.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.asarray(constants.IMAGENET_STD, dtype=np.float32)
# The reference adds -1e10 (not -inf) to masked logits before dividing by the temperature; a masked
# key can then still be picked (with weight exp(-1.4e10) = 0) when fewer than k keys are unmasked.
MASKED_LOGIT = -1e10
JHMDB_JOINTS = 15


# ---------------------------------------------------------------------------------------------
# geometry


def input_size(orig_hw: tuple[int, int], size: Sequence[int]) -> tuple[int, int]:
    """Propagation input (H, W) for a frame of ``orig_hw``.

    Two values: a fixed (H, W), aspect not preserved (DAVIS 480x880, JHMDB 320x320). One value: the
    long side becomes ``size[0]``; the short side is scaled, truncated, then floored to a multiple
    of 64 (VIP: 16:9 -> 448x880), exactly as the reference's ``VOSDataset``.
    """
    if len(size) == 2:
        return int(size[0]), int(size[1])
    if len(size) != 1:
        raise ValueError(f"propagation size must have 1 or 2 values, got {list(size)}")
    ori_h, ori_w = orig_hw
    long_side = int(size[0])
    if ori_w > ori_h:
        new_h = int(ori_h * long_side / ori_w) // 64 * 64
        new_w = long_side
    else:
        new_w = int(ori_w * long_side / ori_h) // 64 * 64
        new_h = long_side
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"propagation size {list(size)} gives an empty frame for a {ori_h}x{ori_w} "
            "input (the short side is floored to a multiple of 64)"
        )
    return new_h, new_w


def grid_size(hw: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Feature grid (gh, gw) = input size / patch size; the input must be a multiple of the patch.

    The reference takes floor for the features and ceil for the labels, so a non-multiple input
    cannot run there either; we say so instead of failing on a shape mismatch later.
    """
    h, w = hw
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"propagation input {h}x{w} is not a multiple of the patch size "
            f"{patch_size}; choose propagation.<dataset>.size accordingly"
        )
    return h // patch_size, w // patch_size


def radius_mask(grid: tuple[int, int], radius: float, device=None):
    """(hw, hw) bool: True where two cells are closer than ``radius`` grid cells (strictly less).

    Euclidean distance between cell indices (row, col), row-major flattening, as the reference's
    ``MaskedAttention``; the radius is in grid cells, not rescaled with the patch size.
    """
    import torch

    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dist = ((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2).float().sqrt()
    return dist < radius


# ---------------------------------------------------------------------------------------------
# queue (context bank)


def context_slots(t: int, queue: int) -> list[int]:
    """Real frame held by each of the 1 + ``queue`` context slots of query frame ``t`` >= 1.

    Slot 0 is the long-term frame 0; slots 1..queue are the reference's padded indices
    t..t+queue-1 of a video with ``queue`` copies of frame 0 prepended (padded p -> real
    max(0, p - queue)), i.e. real frames max(0, t - queue) ... t - 1.
    """
    if t < 1:
        raise ValueError("frame 0 is the annotated frame; queries start at t = 1")
    return [0] + [max(0, p - queue) for p in range(t, t + queue)]


def context_frames(t: int, queue: int) -> tuple[list[int], int]:
    """Unique frames of ``context_slots``: ([0, short-term frames >= 1 ...], duplicate count of frame 0
    among the short-term slots). Frame 0 appears 1 + dup times in total (queue + 2 - t for t <= queue).
    """
    slots = context_slots(t, queue)
    short = slots[1:]
    others = sorted({f for f in short if f > 0})
    return [0] + others, sum(1 for f in short if f == 0)


# ---------------------------------------------------------------------------------------------
# propagation core


def _gather_labels(labels, frame_of_key, cell_of_key, hw: int):
    """Soft labels of keys: labels (T, hw, L), key frame/cell (Q, k) -> (Q, k, L)."""
    flat = labels.reshape(-1, labels.shape[-1])
    return flat[(frame_of_key * hw + cell_of_key).reshape(-1)].reshape(*frame_of_key.shape, -1)


def propagate(
    features,
    first_labels,
    grid: tuple[int, int],
    *,
    topk: int,
    temperature: float,
    radius: float,
    queue: int,
    query_chunk: int = 4096,
    on_frame: Callable | None = None,
    show_progress: bool = False,
):
    """Propagate ``first_labels`` through a video; the fast exact path of spec §4.

    features: (T, hw, C) L2-normalised, on the compute device; cells row-major on ``grid``.
    first_labels: (hw, L) soft labels of frame 0 on the grid.
    Returns (T, hw, L) soft predictions (row 0 = ``first_labels``). ``on_frame(t, pred_t)`` is
    called as each frame is done, so the read-out never needs every frame's map at once.
    """
    import torch
    import torch.nn.functional as F

    n_frames, hw, _ = features.shape
    grid = _check_grid(features, grid)
    device = features.device
    mask = radius_mask(grid, radius, device=device)  # (hw, hw) bool, built once per grid
    preds = torch.zeros(n_frames, hw, first_labels.shape[-1], dtype=features.dtype, device=device)
    preds[0] = first_labels.to(device=device, dtype=features.dtype)
    if on_frame is not None:
        on_frame(0, preds[0])
    frames_iter = range(1, n_frames)
    if show_progress:
        frames_iter = progress(frames_iter, desc="propagate", unit="frame", leave=False)
    for t in frames_iter:
        ctx, dup0 = context_frames(t, queue)
        ctx_t = torch.tensor(ctx, device=device)
        keys = features[ctx_t].reshape(len(ctx) * hw, -1)  # (S*hw, C)
        for q0 in range(0, hw, query_chunk):
            q1 = min(hw, q0 + query_chunk)
            logits = features[t, q0:q1] @ keys.T  # (Q, S*hw); slot 0 = frame 0, unmasked
            far = ~mask[q0:q1]  # (Q, hw)
            frame0_masked = None
            if dup0:  # frame 0 also sits in dup0 short-term slots, radius-masked there
                frame0_masked = logits[:, :hw].masked_fill(far, MASKED_LOGIT)
            logits.view(q1 - q0, len(ctx), hw)[:, 1:].masked_fill_(far[:, None], MASKED_LOGIT)
            k = min(topk, logits.shape[1])
            vals, idx = logits.topk(k, dim=1)  # (Q, k), sorted
            key_frame = ctx_t[idx // hw]
            key_cell = idx % hw
            if frame0_masked is not None:
                # multiset top-k: at most k copies of any key can be selected, so the top-k of
                # frame 0's masked logits repeated min(dup0, k) times stands in for all duplicates
                reps = min(dup0, topk)
                d_vals, d_idx = frame0_masked.topk(min(topk, hw), dim=1)
                vals = torch.cat([vals, d_vals.repeat(1, reps)], dim=1)
                key_frame = torch.cat([key_frame, torch.zeros_like(d_idx).repeat(1, reps)], dim=1)
                key_cell = torch.cat([key_cell, d_idx.repeat(1, reps)], dim=1)
                vals, sel = vals.topk(min(topk, vals.shape[1]), dim=1)
                key_frame = key_frame.gather(1, sel)
                key_cell = key_cell.gather(1, sel)
            weights = F.softmax(vals / temperature, dim=1)  # (Q, k)
            ctx_labels = _gather_labels(preds, key_frame, key_cell, hw)  # (Q, k, L)
            preds[t, q0:q1] = (ctx_labels * weights[..., None]).sum(1)
        if on_frame is not None:
            on_frame(t, preds[t])
    return preds


def _check_grid(features, grid: tuple[int, int]) -> tuple[int, int]:
    if features.ndim != 3 or grid[0] * grid[1] != features.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} are not (T, hw, C) on a {grid} grid")
    return int(grid[0]), int(grid[1])


def propagate_reference(
    features,
    first_labels,
    grid: tuple[int, int],
    *,
    topk: int,
    temperature: float,
    radius: float,
    queue: int,
    frame_chunk: int = 2,
    cell_chunk: int = 100,
):
    """The reference's straightforward algorithm, for tests and the benchmark (not for runs).

    Host key bank: ``queue`` padded copies of frame 0 prepended, the (T, 1 + queue, hw, C) context
    features gathered on the host per 2-frame chunk, an additive -1e10 radius mask on the
    short-term slots, and 100-query-cell chunks; top-k/softmax over the concatenated slot axis.
    """
    import torch
    import torch.nn.functional as F

    n_frames, hw, _ = features.shape
    grid = _check_grid(features, grid)
    feats = features.detach().cpu()
    padded = torch.cat([feats[:1].expand(queue, -1, -1), feats])  # (queue + T, hw, C)
    n_query = n_frames
    # slot table: query t (padded index t + queue) -> long slot 0 + padded indices t .. t+queue-1
    key_index = torch.cat(
        [torch.zeros(n_query, 1, dtype=torch.long), torch.arange(queue)[None] + torch.arange(n_query)[:, None]], dim=1
    )
    additive = torch.zeros(hw, hw, dtype=feats.dtype)
    additive[~radius_mask(grid, radius)] = MASKED_LOGIT
    weights_all, index_all = [], []
    for f0 in range(0, n_query, frame_chunk):
        keys = padded[key_index[f0 : f0 + frame_chunk]]  # (F, 1 + queue, hw, C) host key bank
        query = padded[queue + f0 : queue + f0 + frame_chunk]  # (F, hw, C)
        w_chunks, i_chunks = [], []
        for c0 in range(0, hw, cell_chunk):
            aff = torch.einsum("fskc,fqc->fskq", keys, query[:, c0 : c0 + cell_chunk])
            aff[:, 1:] += additive[:, c0 : c0 + cell_chunk]  # short-term slots only
            n_f, n_s, _, n_q = aff.shape
            aff = aff.reshape(n_f, n_s * hw, n_q) / temperature
            w, i = aff.topk(min(topk, n_s * hw), dim=1)
            w_chunks.append(F.softmax(w, dim=1))
            i_chunks.append(i)
        weights_all.extend(torch.cat(w_chunks, dim=-1))
        index_all.extend(torch.cat(i_chunks, dim=-1))
    labels = torch.zeros(queue + n_frames, hw, first_labels.shape[-1], dtype=feats.dtype)
    labels[: queue + 1] = first_labels.detach().cpu().to(feats.dtype)
    for t in range(1, n_frames):
        ctx = labels[key_index[t]].reshape(-1, labels.shape[-1])  # (S*hw, L)
        labels[queue + t] = (ctx[index_all[t]] * weights_all[t][..., None]).sum(0)
    return labels[queue:]


# ---------------------------------------------------------------------------------------------
# labels and read-out


def segmentation_labels(ids, label_set: Sequence[int], grid: tuple[int, int], downsample: str = "bilinear"):
    """One-hot of ``label_set`` at input resolution, resized to the grid -> (gh, gw, L) float32.

    ``ids`` (H, W) uint8 at the propagation input size. ``downsample="bilinear"`` is the reference
    (OpenCV INTER_LINEAR without antialias: each cell is a point sample at the patch centre);
    ``"area"`` averages each patch instead (INTER_AREA), an option outside the reference protocol.
    """
    import cv2

    flags = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}
    if downsample not in flags:
        raise ValueError(f"label_downsample must be one of {sorted(flags)}, got {downsample!r}")
    onehot = np.stack([ids == v for v in label_set], axis=-1).astype(np.float32)
    out = np.empty((grid[0], grid[1], len(label_set)), np.float32)
    # OpenCV resizes at most 512 channels at once and drops a single channel's axis
    for c0 in range(0, len(label_set), 512):
        res = cv2.resize(onehot[..., c0 : c0 + 512], (grid[1], grid[0]), interpolation=flags[downsample])
        out[..., c0 : c0 + 512] = res.reshape(grid[0], grid[1], -1)
    return out


def jhmdb_heatmaps(joints_grid, grid: tuple[int, int], sigma: float = 0.5):
    """(gh, gw, 1 + 15) heatmaps: background channel first, one Gaussian per joint.

    ``joints_grid`` (2, J) x/y in grid units (0-based). Reproduces the reference's
    ``draw_labelmap_np``: an unnormalised Gaussian (peak 1) on a (6 sigma + 1)-wide stamp whose
    upper-left corner is int(pt - 3 sigma) (truncation toward zero, so the peak lands at
    int(pt - 1.5) + 2 for sigma 0.5: +1 near the top/left border), pasted (not max-ed) and clipped
    at the edges; a stamp entirely outside the grid leaves the channel at zero.
    """
    gh, gw = grid
    n_joints = joints_grid.shape[1]
    maps = np.zeros((gh, gw, n_joints), np.float64)
    size = 6 * sigma + 1
    ax = np.arange(0, size, 1, float)
    centre = size // 2
    stamp = np.exp(-((ax[None, :] - centre) ** 2 + (ax[:, None] - centre) ** 2) / (2 * sigma**2))
    for j in range(n_joints):
        x, y = float(joints_grid[0, j]), float(joints_grid[1, j])
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        ul = (int(x - 3 * sigma), int(y - 3 * sigma))
        br = (int(x + 3 * sigma + 1), int(y + 3 * sigma + 1))
        if ul[0] >= gw or ul[1] >= gh or br[0] < 0 or br[1] < 0:
            continue
        sx = (max(0, -ul[0]), min(br[0], gw) - ul[0])
        sy = (max(0, -ul[1]), min(br[1], gh) - ul[1])
        ix = (max(0, ul[0]), min(br[0], gw))
        iy = (max(0, ul[1]), min(br[1], gh))
        maps[iy[0] : iy[1], ix[0] : ix[1], j] = stamp[sy[0] : sy[1], sx[0] : sx[1]]
    background = (maps.sum(-1) == 0)[..., None]
    return np.concatenate([background, maps], axis=-1).astype(np.float32)


def keypoints_readout(pred, grid: tuple[int, int], topk: int = 5):
    """(hw or gh x gw, 1 + J) soft heatmaps -> (2, J) x/y in grid units; (-1, -1) for an all-zero joint map.

    Background dropped; per joint the top-``topk`` cells by value, weights normalised to sum 1,
    weighted mean of (col, row) with no +0.5 (reference ``process_pose``, top-5).
    """
    import torch

    joint_maps = torch.as_tensor(pred).reshape(-1, pred.shape[-1])[:, 1:]
    k = min(topk, joint_maps.shape[0])
    vals, idx = joint_maps.topk(k, dim=0)  # (k, J)
    vals = vals / vals.sum(0, keepdim=True)
    cols, rows = idx % grid[1], idx // grid[1]
    coords = torch.stack([(cols * vals).sum(0), (rows * vals).sum(0)])
    coords[:, joint_maps.sum(0) == 0] = -1
    return coords


def segmentation_readout(
    pred_grid, input_hw: tuple[int, int], label_set: Sequence[int], out_hw: tuple[int, int] | None = None
):
    """(gh, gw, L) soft map -> (H, W) uint8 ids: OpenCV bilinear to the input size, argmax, ids,
    then a nearest resize to ``out_hw`` (the ground-truth size) if given."""
    import cv2

    pred_grid = np.ascontiguousarray(pred_grid, dtype=np.float32)
    h, w = input_hw
    upsampled = np.empty((h, w, pred_grid.shape[-1]), np.float32)
    for c0 in range(0, pred_grid.shape[-1], 512):
        res = cv2.resize(pred_grid[..., c0 : c0 + 512], (w, h), interpolation=cv2.INTER_LINEAR)
        upsampled[..., c0 : c0 + 512] = res.reshape(h, w, -1)
    ids = np.asarray(label_set, dtype=np.uint8)[upsampled.argmax(-1)]
    if out_hw is not None and tuple(out_hw) != (h, w):
        ids = cv2.resize(ids, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_NEAREST)
    return ids


# ---------------------------------------------------------------------------------------------
# frames and features


def load_frame(rgb: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 RGB -> (3, H', W') float32 normalised input and the resized [0, 1] RGB image.

    Order as the reference: /255 in float32, then OpenCV bilinear resize (skipped at the same
    size), then ImageNet mean/std.
    """
    import cv2

    img = rgb.astype(np.float32) / 255.0
    if img.shape[:2] != tuple(hw):
        img = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return ((img - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), img


def encode_frames(encoder, frames: Iterable[np.ndarray], batch_size: int, device):
    """Normalised (3, H, W) frames -> (T, hw, C) L2-normalised final-norm patch tokens on device.

    Each real frame is encoded once (the reference also encodes its ``queue`` padded copies).
    """
    import torch
    import torch.nn.functional as F

    out, batch = [], []

    def flush():
        x = torch.from_numpy(np.stack(batch)).to(device)
        feats = encoder.dense_features(x)  # (B, C, gh, gw)
        feats = F.normalize(feats, dim=1).flatten(2).transpose(1, 2)  # (B, hw, C) row-major
        out.append(feats.float())
        batch.clear()

    with torch.inference_mode():
        for frame in frames:
            batch.append(frame)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# one video


@dataclass
class Protocol:
    """The propagation settings of one dataset (config ``propagation`` + its dataset section)."""

    dataset: str
    size: list[int]
    topk: int
    temperature: float = 0.7
    radius: float = 20
    queue: int = 20
    feature_batch: int = 5
    query_chunk: int = 4096
    label_downsample: str = "bilinear"
    gt_mode: str | None = None  # DAVIS only
    sigma: float = 0.5  # JHMDB only
    readout_topk: int = 5  # JHMDB only

    @classmethod
    def from_settings(cls, dataset: str, settings: dict) -> Protocol:
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        section = section_defaults("propagation", overrides=settings)
        ds = section[dataset]
        return cls(
            dataset=dataset,
            size=list(ds["size"]),
            topk=ds["topk"],
            temperature=section["temperature"],
            radius=section["radius"],
            queue=section["queue"],
            feature_batch=section["feature_batch"],
            query_chunk=section["query_chunk"],
            label_downsample=section["label_downsample"],
            gt_mode=ds.get("gt_mode"),
            sigma=ds.get("sigma", 0.5),
            readout_topk=ds.get("readout_topk", 5),
        )


@dataclass
class VideoResult:
    """What a dataset writer needs from one propagated video."""

    input_hw: tuple[int, int]
    grid: tuple[int, int]
    orig_hw: tuple[int, int]
    images: dict[int, np.ndarray]  # kept resized [0, 1] RGB frames (figures), by frame index


def propagate_video(
    encoder,
    frame_paths: Sequence[Path],
    read_frame: Callable,
    protocol: Protocol,
    first_labels: Callable,
    on_frame: Callable,
    device,
    keep_images: Sequence[int] = (),
) -> VideoResult:
    """Encode the frames, build frame 0's grid labels, propagate, hand each frame to ``on_frame``.

    first_labels(rgb0_uint8, input_hw, grid) -> (gh, gw, L) array; on_frame(t, (gh, gw, L) numpy).
    """
    import torch

    first = read_frame(frame_paths[0])
    orig_hw = first.shape[:2]
    hw = input_size(orig_hw, protocol.size)
    grid = grid_size(hw, encoder.patch_size)
    images: dict[int, np.ndarray] = {}

    def frames():
        for t, path in enumerate(frame_paths):
            rgb = first if t == 0 else read_frame(path)
            if rgb.shape[:2] != orig_hw:
                raise ValueError(f"{path}: frame size {rgb.shape[:2]} differs from the video's first frame {orig_hw}")
            x, resized = load_frame(rgb, hw)
            if t in keep_images:
                images[t] = resized
            yield x

    with torch.inference_mode():
        feats = encode_frames(encoder, frames(), protocol.feature_batch, device)
        labels0 = torch.from_numpy(first_labels(first, hw, grid)).reshape(grid[0] * grid[1], -1)
        propagate(
            feats,
            labels0,
            grid,
            topk=protocol.topk,
            temperature=protocol.temperature,
            radius=protocol.radius,
            queue=protocol.queue,
            query_chunk=protocol.query_chunk,
            on_frame=lambda t, p: on_frame(t, p.reshape(*grid, -1).cpu().numpy()),
            show_progress=True,
        )
    return VideoResult(hw, grid, orig_hw, images)


# ---------------------------------------------------------------------------------------------
# per-dataset writers (standard result layouts, spec §3)


def _write_png(path: Path, ids: np.ndarray, palette: np.ndarray | None = None) -> None:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8), mode="L")
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette.ravel().tolist())
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp, format="PNG")


@dataclass
class Video:
    """One video to propagate: name, frames, and the dataset-specific label/readout plumbing."""

    name: str
    frames: list[Path]
    first_labels: Callable  # (rgb0, input_hw, grid) -> (gh, gw, L)
    on_frame: Callable  # (t, (gh, gw, L) soft map) -> None; writes the prediction of frame t
    finish: Callable  # () -> None; writes per-video files once every frame is done
    overlay: Callable  # (t, resized image) -> (image, keypoints or None) for the figure
    state: dict  # per-video scratch shared by the callbacks; "keep" = frames kept for figures


def davis_videos(root, out_dir: Path, protocol: Protocol, names=None) -> list[Video]:
    """DAVIS-2017: indexed palette PNGs ``<seq>/<frame stem>.png``.

    Sizes: with ``gt_mode="resized"`` the scorer compares against GT nearest-resized to the input
    size (the reference's DAVIS_480_880 copy), so predictions stay at the input size; with
    ``"native"`` they are nearest-resized (OpenCV, as ``convert_davis.py``) to the size of the
    sequence's frame-0 annotation.
    """
    import cv2

    from pipeline.data.readers import DavisDataset

    ds = DavisDataset(root, sequences=names)
    palette = np.asarray(constants.pascal_palette(), np.uint8).reshape(256, 3)
    videos = []
    for seq in ds.sequences:
        frames, annotations = ds.frames(seq), ds.annotations(seq)
        state: dict = {}

        def first_labels(rgb0, hw, grid, seq=seq, annotations=annotations, state=state):
            gt = ds.read_annotation(annotations[0])
            if gt.shape != rgb0.shape[:2]:
                raise ValueError(f"{annotations[0]}: annotation size {gt.shape} != frame size {rgb0.shape[:2]}")
            state["gt_hw"] = gt.shape
            ids = cv2.resize(gt, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
            state["label_set"] = np.unique(ids).tolist()
            state["hw"], state["first_ids"] = hw, ids
            return segmentation_labels(ids, state["label_set"], grid, protocol.label_downsample)

        def on_frame(t, soft, seq=seq, frames=frames, state=state):
            out_hw = state["hw"] if protocol.gt_mode == "resized" else state["gt_hw"]
            ids = segmentation_readout(soft, state["hw"], state["label_set"], out_hw)
            if t in state.get("keep", ()):
                state.setdefault("ids", {})[t] = ids
            _write_png(out_dir / seq / f"{frames[t].stem}.png", ids, palette)

        def overlay(t, img, state=state):
            ids = state["first_ids"] if t == 0 else state["ids"][t]
            return _blend(
                img, cv2.resize(ids, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST), palette
            ), None

        videos.append(Video(seq, frames, first_labels, on_frame, lambda: None, overlay, state))
    return videos


def vip_videos(root, out_dir: Path, protocol: Protocol, names=None) -> list[Video]:
    """VIP: grey class-id PNGs ``videos<N>/<frame stem>.png`` at the GT size (PIL nearest)."""
    import cv2

    from pipeline.data.readers import VipDataset

    ds = VipDataset(root, videos=names)
    colours = _class_colours(20)
    videos = []
    for name in ds.videos:
        frames, annotations = ds.frames(name), ds.annotations(name)
        gt_by_stem = {p.stem: p for p in annotations}
        state: dict = {}

        def first_labels(rgb0, hw, grid, annotations=annotations, state=state):
            gt = ds.read_annotation(annotations[0])
            ids = cv2.resize(gt, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
            state["label_set"] = np.unique(ids).tolist()
            state["hw"], state["first_ids"] = hw, ids
            return segmentation_labels(ids, state["label_set"], grid, protocol.label_downsample)

        def on_frame(t, soft, name=name, frames=frames, state=state, gt_by_stem=gt_by_stem):
            ids = segmentation_readout(soft, state["hw"], state["label_set"])
            if t in state.get("keep", ()):
                state.setdefault("ids", {})[t] = ids
            gt_path = gt_by_stem.get(frames[t].stem)
            if gt_path is None:  # unannotated frame: nothing to score, keep the input size
                out = ids
            else:  # PIL nearest, as the reference VIP scorer resizes predictions
                from PIL import Image

                with Image.open(gt_path) as im:
                    out = pil_nearest(ids, (im.height, im.width))
            _write_png(out_dir / name / f"{frames[t].stem}.png", out)

        def overlay(t, img, state=state):
            ids = state["first_ids"] if t == 0 else state["ids"][t]
            return _blend(img, ids, colours), None

        videos.append(Video(name, frames, first_labels, on_frame, lambda: None, overlay, state))
    return videos


def jhmdb_videos(root, out_dir: Path, protocol: Protocol, names=None) -> list[Video]:
    """JHMDB: ``<class>/<video>/joint_positions.mat`` with ``pos_img`` (2, 15, T), 1-based pixels of
    the original frames; a joint that cannot be placed (all-zero map) is NaN."""
    import scipy.io

    from pipeline.data.readers import JhmdbDataset

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
            grid, (ori_h, ori_w) = state["grid"], state["orig_hw"]
            n_gt = state["n_gt"]
            if n_gt != len(frames):
                LOG.warning(
                    "%s: %d frames but pos_img has %d; writing %d (NaN past the last frame)",
                    name,
                    len(frames),
                    n_gt,
                    n_gt,
                )
            coords = np.full((2, JHMDB_JOINTS, n_gt), -1.0)  # grid units, -1 = not placed
            for t in range(min(n_gt, len(frames))):
                coords[..., t] = state["coords"][t]
            pos = np.empty_like(coords)
            # grid units -> 0-based original pixels (the reference scorer's x * W / feat_res with
            # feat_res = the grid, not a hard-coded 20), then 1-based like pos_img
            pos[0] = coords[0] * ori_w / grid[1] + 1
            pos[1] = coords[1] * ori_h / grid[0] + 1
            pos[:, (coords < 0).any(0)] = np.nan
            path = out_dir / name / "joint_positions.mat"
            with atomic_path(path, suffix=".mat") as tmp, open(tmp, "wb") as fh:
                scipy.io.savemat(fh, {"pos_img": pos})

        def overlay(t, img, state=state):
            grid = state["grid"]
            xy = state["coords"][t].astype(np.float64)
            # same mapping as the scored positions (cell index x patch, no +0.5)
            pts = np.stack([xy[0] * img.shape[1] / grid[1], xy[1] * img.shape[0] / grid[0]])
            pts[:, (xy < 0).any(0)] = np.nan
            return img, pts

        videos.append(Video(name, frames, first_labels, on_frame, finish, overlay, state))
    return videos


WRITERS = {"davis": davis_videos, "vip": vip_videos, "jhmdb": jhmdb_videos}


def score_predictions(
    dataset: str, root: Path, pred_dir: Path, scores_dir: Path, protocol: Protocol, names: Sequence[str]
) -> dict[str, float]:
    """Score ``pred_dir`` with ``pipeline.propagation.score`` into a fresh ``scores_dir``; headline metrics in %.

    The scorers' own CSVs (DAVIS per-sequence/per-object, VIP per-class, JHMDB per-joint) stay in
    ``scores_dir``.
    """
    from pipeline.propagation import score

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


# ---------------------------------------------------------------------------------------------
# figures (paper Figures 6-8: frame 0 with its labels, then a few propagated frames)

# JHMDB skeleton: parent joint of each joint (reference ``vis_pose``)
JHMDB_PARENT = (1, 1, 0, 0, 1, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10)


def _class_colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return (np.array([cmap(i % 20)[:3] for i in range(max(n, 1))]) * 255).astype(np.uint8)


def _blend(img: np.ndarray, ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """[0, 1] RGB image with non-zero ids painted half-transparent in their colour."""
    out = img.copy()
    fg = ids > 0
    out[fg] = 0.5 * img[fg] + 0.5 * colours[ids[fg].astype(np.int64) % len(colours)] / 255.0
    return out


def figure_frames(n_frames: int, panels: int = 4) -> list[int]:
    """Frame 0 plus ``panels - 1`` propagated frames spread over the video (last one included)."""
    if n_frames <= 1:
        return [0]
    picks = np.linspace(0, n_frames - 1, min(panels, n_frames)).round().astype(int)
    return sorted(set(picks.tolist()))


def save_figure(video: Video, images: dict[int, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = sorted(images)
    fig, axes = plt.subplots(1, len(frames), figsize=(3.2 * len(frames), 2.6), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, t in zip(axes[0], frames):
        img, pts = video.overlay(t, images[t])
        ax.imshow(np.clip(img, 0, 1))
        if pts is not None:
            for j, parent in enumerate(JHMDB_PARENT):
                ax.plot([pts[0, j], pts[0, parent]], [pts[1, j], pts[1, parent]], "-", color=colours(j % 20), lw=2)
            ax.scatter(pts[0], pts[1], s=10, c="white", edgecolors="black", linewidths=0.5)
        ax.set_title("frame 0 (labels)" if t == 0 else f"frame {t}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# stage entry point


def _safe_name(name: str) -> str:
    return name.replace("/", "__")


def model_name_from_checkpoint(checkpoint: str | Path) -> str:
    """``results/pretrain/<model>/checkpoint.pth`` -> ``<model>``; else the parent folder name."""
    parts = Path(checkpoint).parts
    if "pretrain" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("pretrain")
        if i < len(parts) - 2:
            return "/".join(parts[i + 1 : -1])
    return Path(checkpoint).parent.name


def run(
    checkpoint: str | Path,
    dataset: str,
    root: str | Path,
    output_dir: str | Path,
    settings: dict | None = None,
    model: str | None = None,
    device: str | None = None,
):
    """Propagate every video of ``dataset`` under ``root``, write predictions, score them, and write
    ``metrics.csv``. Returns the metrics row as a dict.

    Resumable: a video whose predictions are complete (marker under ``predictions/.done``) is
    skipped when the run key (checkpoint hash, protocol, root, code) is unchanged; otherwise the
    stale predictions are removed first, so the scorer never sees another run's files.
    """
    from pipeline.data.readers import read_rgb, read_vallist
    from pipeline.pretrain.models_mae import load_encoder

    settings = settings or {}
    protocol = Protocol.from_settings(dataset, settings)
    section = section_defaults("propagation", overrides=settings)
    vallist = section[dataset].get("vallist")
    names = [e.name for e in read_vallist(dataset, vallist)] if vallist else None
    output_dir, root = Path(output_dir), Path(root)
    pred_dir = output_dir / "predictions"
    device = resolve_device(device)
    model = model or model_name_from_checkpoint(checkpoint)

    run_key = json.dumps(
        {
            "checkpoint_sha256": file_sha256(checkpoint),
            "protocol": protocol.__dict__,
            "root": str(root.resolve()),
            "vallist": names,
            "code_sha256": file_sha256(__file__),
        },
        sort_keys=True,
    )
    key_file = pred_dir / ".run_key.json"
    if pred_dir.exists() and (not key_file.exists() or key_file.read_text() != run_key):
        LOG.info("removing predictions of a different run: %s", pred_dir)
        shutil.rmtree(pred_dir)
    write_text_atomic(key_file, run_key)

    encoder = load_encoder(checkpoint, device=device)
    videos = WRITERS[dataset](root, pred_dir, protocol, names)
    n_figures = section["figures"]
    LOG.info(
        "%s: %d videos, protocol %s, patch %d, device %s", dataset, len(videos), protocol, encoder.patch_size, device
    )
    done_dir = pred_dir / ".done"
    n_frames = 0
    for i, video in enumerate(progress(videos, desc=f"{dataset} videos", unit="video")):
        n_frames += len(video.frames)
        marker = done_dir / _safe_name(video.name)
        if marker.exists():
            continue
        keep = figure_frames(len(video.frames)) if i < n_figures else []
        video.state["keep"] = set(keep)
        result = propagate_video(
            encoder, video.frames, read_rgb, protocol, video.first_labels, video.on_frame, device, keep_images=keep
        )
        video.finish()
        if keep:
            save_figure(
                video,
                result.images,
                output_dir / "figures" / f"{_safe_name(video.name)}.png",
                f"{model} - {dataset} {video.name}",
            )
        write_text_atomic(
            marker, json.dumps({"frames": len(video.frames), "input_hw": result.input_hw, "grid": result.grid})
        )

    metrics = score_predictions(
        dataset, root, pred_dir, output_dir / "scores", protocol, names=[v.name for v in videos]
    )
    row = {
        "dataset": dataset,
        "model": model,
        **metrics,
        "size": "x".join(str(s) for s in protocol.size),
        "topk": protocol.topk,
        "temperature": protocol.temperature,
        "radius": protocol.radius,
        "queue": protocol.queue,
        "gt_mode": protocol.gt_mode or "",
        "patch_size": encoder.patch_size,
        "label_downsample": protocol.label_downsample,
        "videos": len(videos),
        "frames": n_frames,
        "checkpoint": str(checkpoint),
    }
    import pandas as pd

    write_csv_atomic(pd.DataFrame([row]), output_dir / "metrics.csv")
    LOG.info("metrics: %s", {k: row[k] for k in metrics})
    return row


# ---------------------------------------------------------------------------------------------
# CLI


def _run_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.propagation.runner",
        description="Label propagation of one encoder on one dataset (reference protocol), then "
        "scoring. Checkpoints of a random-init or an external encoder are made by "
        "'python -m pipeline.pretrain.models_mae init-random / import-external'.",
    )
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint (payload or MAE format)")
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--root", required=True, help="dataset root in the official layout")
    ap.add_argument("--output-dir", required=True, help="results/eval/<model>/<dataset>")
    ap.add_argument("--settings", help="config 'propagation' section (JSON or file); partial is fine")
    ap.add_argument(
        "--dataset-settings", help="config 'propagation.<dataset>' section (JSON); overrides the one in --settings"
    )
    ap.add_argument("--model", help="model name for metrics.csv (default: from the checkpoint path)")
    ap.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    args = _run_parser().parse_args(argv)
    set_threads(args.threads)
    settings = load_settings(args.settings)
    if args.dataset_settings:
        settings[args.dataset] = load_settings(args.dataset_settings)
    run(args.checkpoint, args.dataset, args.root, args.output_dir, settings, model=args.model, device=args.device)


if __name__ == "__main__":
    main()
