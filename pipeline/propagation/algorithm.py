"""Label propagation, the reference protocol's algorithm: geometry, context queue, propagation, labels.

The protocol is CropMAE's evaluation (itself videowalk's, ``downstreams/propagation``); the numbers only match the published ones when every
detail matches, so the quirks are reproduced and named here:

* frames (``pipeline.propagation.run.load_frame``): OpenCV read, RGB, /255, OpenCV bilinear
  resize (no antialias), ImageNet normalization; a two-value size is a fixed (H, W), a one-value
  size is the long side with the short side floored to a multiple of 64 (VIP);
* features: the encoder's final-norm patch tokens (``ViTEncoder.dense_features``), L2-normalized over
  channels; the grid is always input size / patch size (ViT-S/8 works);
* context for query frame t: frame 0 as the long-term slot (never radius-restricted) plus ``queue``
  short-term slots holding real frames max(0, t - queue) ... t - 1 — the reference prepends ``queue``
  copies of frame 0 to the video, so frame 0 fills (queue + 2 - t) slots for 1 <= t <= queue and the
  duplicates are separate keys (multiset top-k);
* affinity = dot products; short-term slots get -1e10 outside a Euclidean radius (strictly less, in
  grid cells); logits / temperature; top-k over all context keys; softmax over the k logits;
  prediction = weighted sum of the keys' **soft** labels; frame 0's prediction is its own label map;
* labels: DAVIS/VIP one-hot of the frame-0 label set at input resolution, resized to the grid with
  OpenCV bilinear (a point sample at the patch center: ``label_downsample="bilinear"``, the
  reference); JHMDB 15 Gaussian heatmaps (sigma 0.5 cell, 4x4 stamp) plus a background channel;
* read-out: OpenCV bilinear upsample to the input size, argmax, ids, nearest resize to the GT size;
  JHMDB: weighted mean of the top-5 cells per joint.

Speed/memory (spec §4): features are computed once per real frame and stay on the device; for each
query frame one affinity product against the stacked unique context frames, a precomputed boolean
radius mask, and frame 0's masked logits reused (top-k of them repeated) for its duplicate slots, so
the multiset top-k equals the reference's without a host key bank or padded duplicate forwards.
The reference's straightforward algorithm (host key bank with padded duplicates, per-chunk gathers)
lives in ``tests/propagation_reference.py`` for the equivalence tests and the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.runtime import progress

# The reference adds -1e10 (not -inf) to masked logits before dividing by the temperature; a masked
# key can then still be picked (with weight exp(-1.4e10) = 0) when fewer than k keys are unmasked.
MASKED_LOGIT = -1e10


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
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dist = ((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2).float().sqrt()
    return dist < radius


def check_grid(features, grid: tuple[int, int]) -> tuple[int, int]:
    """``grid`` as ints, or ValueError when ``features`` are not (T, gh * gw, C)."""
    if features.ndim != 3 or grid[0] * grid[1] != features.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} are not (T, hw, C) on a {grid} grid")
    return int(grid[0]), int(grid[1])


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

    features: (T, hw, C) L2-normalized, on the compute device; cells row-major on ``grid``.
    first_labels: (hw, L) soft labels of frame 0 on the grid.
    Returns (T, hw, L) soft predictions (row 0 = ``first_labels``). ``on_frame(t, pred_t)`` is
    called as each frame is done, so the read-out never needs every frame's map at once.
    """
    n_frames, hw, _ = features.shape
    grid = check_grid(features, grid)
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
            key_frame, key_cell, weights = _select_keys(
                features[t, q0:q1], keys, ctx_t, ~mask[q0:q1], dup0, topk, temperature
            )
            ctx_labels = _gather_labels(preds, key_frame, key_cell, hw)  # (Q, k, L)
            preds[t, q0:q1] = (ctx_labels * weights[..., None]).sum(1)
        if on_frame is not None:
            on_frame(t, preds[t])
    return preds


def _select_keys(query, keys, ctx_t, far, dup0: int, topk: int, temperature: float):
    """Top-k context keys of one query chunk: (key frame, key cell, softmax weight), each (Q, k).

    query (Q, C); keys (S*hw, C) of the unique context frames ``ctx_t`` (frame 0 first); far (Q, hw)
    True outside the radius; frame 0 also sits in ``dup0`` radius-masked short-term slots.
    """
    n_query, hw = far.shape
    logits = query @ keys.T  # (Q, S*hw); slot 0 = frame 0, unmasked
    frame0_masked = None
    if dup0:  # frame 0 also sits in dup0 short-term slots, radius-masked there
        frame0_masked = logits[:, :hw].masked_fill(far, MASKED_LOGIT)
    logits.view(n_query, len(ctx_t), hw)[:, 1:].masked_fill_(far[:, None], MASKED_LOGIT)
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
    return key_frame, key_cell, weights


# ---------------------------------------------------------------------------------------------
# labels and read-out


def segmentation_labels(ids, label_set: Sequence[int], grid: tuple[int, int], downsample: str = "bilinear"):
    """One-hot of ``label_set`` at input resolution, resized to the grid -> (gh, gw, L) float32.

    ``ids`` (H, W) uint8 at the propagation input size. ``downsample="bilinear"`` is the reference
    (OpenCV INTER_LINEAR without antialias: each cell is a point sample at the patch center);
    ``"area"`` averages each patch instead (INTER_AREA), an option outside the reference protocol.
    """
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
    ``draw_labelmap_np``: an unnormalized Gaussian (peak 1) on a (6 sigma + 1)-wide stamp whose
    upper-left corner is int(pt - 3 sigma) (truncation toward zero, so the peak lands at
    int(pt - 1.5) + 2 for sigma 0.5: +1 near the top/left border), pasted (not max-ed) and clipped
    at the edges; a stamp entirely outside the grid leaves the channel at zero.
    """
    gh, gw = grid
    n_joints = joints_grid.shape[1]
    maps = np.zeros((gh, gw, n_joints), np.float64)
    size = 6 * sigma + 1
    ax = np.arange(0, size, 1, float)
    center = size // 2
    stamp = np.exp(-((ax[None, :] - center) ** 2 + (ax[:, None] - center) ** 2) / (2 * sigma**2))
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

    Background dropped; per joint the top-``topk`` cells by value, weights normalized to sum 1,
    weighted mean of (col, row) with no +0.5 (reference ``process_pose``, top-5).
    """
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
