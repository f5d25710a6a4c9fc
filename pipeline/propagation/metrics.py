"""Label-propagation metrics: DAVIS-2017 J and F, VIP mIoU, JHMDB PCK.

Pure NumPy / OpenCV / scikit-image. The definitions follow the reference evaluations exactly
(official davis2017-evaluation toolkit, CropMAE's ``eval_vip.py`` and ``eval_pck.py``), including
their quirks, which are named and pinned by tests (tests/propagation/test_metrics.py, tests/propagation/test_score.py). The per-frame DAVIS scorer :func:`davis_frame_scores` computes every object of a frame at once:
J from one joint histogram of (GT id, predicted id); F from sparse boundary pixels of every object
found in one pass over each id map, each dilation restricted to its boundary's bounding box (the
dilation is zero outside it). Same numbers as the toolkit, faster.

Layouts: masks are ``(H, W)`` (or ``(..., H, W)`` where stated); JHMDB coordinates are ``(2, 15, T)``
arrays of (x, y) per joint per frame.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import cv2
import numpy as np

# DAVIS boundary tolerance as a fraction of the image diagonal (toolkit default ``bound_th``).
BOUNDARY_TH = 0.008

VIP_NUM_CLASSES = 20
# Joint and class names live in pipeline.data.readers (JHMDB_JOINTS, VIP_CLASSES).
PCK_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)
# Reference normalizer: 0.6 x diagonal of the per-frame box of the visible GT joints.
PCK_BOX_SCALE = 0.6


# ----------------------------------------------------------------------------------------------
# DAVIS: region similarity J
# ----------------------------------------------------------------------------------------------


def db_eval_iou(annotation: np.ndarray, segmentation: np.ndarray):
    """Jaccard index of binary masks ``(..., H, W)``; 1 where the union is empty (toolkit rule)."""
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ")
    annotation = annotation.astype(bool)
    segmentation = segmentation.astype(bool)
    inters = np.sum(annotation & segmentation, axis=(-2, -1))
    union = np.sum(annotation | segmentation, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inters / union
    j = np.where(union == 0, 1.0, j)
    return float(j) if j.ndim == 0 else j


# ----------------------------------------------------------------------------------------------
# DAVIS: boundary F
# ----------------------------------------------------------------------------------------------


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel boundary map of binary masks ``(..., H, W)`` (toolkit ``_seg2bmap``).

    A pixel is a boundary pixel when it differs from its right, lower or lower-right neighbour; the
    last row only looks right, the last column only looks down, the bottom-right pixel is never one.
    """
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def boundary_tolerance(shape: tuple[int, ...], bound_th: float = BOUNDARY_TH) -> int:
    """Dilation radius in pixels: ``ceil(bound_th * diagonal)`` (8 at 480x854, 9 at 480x880).

    A ``bound_th >= 1`` is taken as the radius itself, as in the toolkit.
    """
    if bound_th >= 1:
        return int(bound_th)
    h, w = shape[-2:]
    return int(np.ceil(bound_th * np.linalg.norm([h, w])))


@lru_cache(maxsize=16)
def disk_kernel(radius: int) -> np.ndarray:
    """skimage ``disk(radius)`` as a uint8 cv2 kernel (strict radius: r = 8 -> 17x17, 197 ones)."""
    from skimage.morphology import disk  # noqa: PLC0415  (0.8 s of imports a job; only F uses it)

    kernel = disk(int(radius)).astype(np.uint8)
    kernel.setflags(write=False)
    return kernel


def boundary_points(ids: np.ndarray, n_objects: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``seg2bmap(ids == k)`` of every object ``k = 1..n_objects`` as sparse ``(rows, cols)``.

    One pass over the id map instead of one per object: ``seg2bmap`` marks a pixel when its object
    membership differs from its right, lower or lower-right neighbour inside the image (its last
    row / column cases are exactly "neighbours outside the image do not count"). So for every pair
    of such neighbours with different ids, the pixel is a boundary pixel of both ids. A pixel may
    be listed more than once; consumers count distinct pixels.
    """
    ids = np.asarray(ids)
    h, w = ids.shape
    flats, owners = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        here, there = ids[: h - dy, : w - dx], ids[dy:, dx:]
        rel = np.flatnonzero(here != there)  # 1-D nonzero is much faster than 2-D np.nonzero
        y, x = np.divmod(rel, w - dx)
        flat = y * w + x
        flats += [flat, flat]
        owners += [here[y, x], there[y, x]]
    flat = np.concatenate(flats)
    owner = np.concatenate(owners)
    return [np.divmod(flat[owner == k], w) for k in range(1, int(n_objects) + 1)]


def _window(points: tuple[np.ndarray, np.ndarray], pad: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` of non-empty points, padded by ``pad``, clipped to the image."""
    ys, xs = points
    return (
        max(int(ys.min()) - pad, 0),
        min(int(ys.max()) + pad + 1, shape[0]),
        max(int(xs.min()) - pad, 0),
        min(int(xs.max()) + pad + 1, shape[1]),
    )


def _canvas(points: tuple[np.ndarray, np.ndarray], window: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 map of the window with the points inside it set to 1 (repeated points set once)."""
    y0, y1, x0, x1 = window
    ys, xs = points
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    canvas[ys[inside] - y0, xs[inside] - x0] = 1
    return canvas


def _hits_within(
    points: tuple[np.ndarray, np.ndarray], target: tuple[np.ndarray, np.ndarray], radius: int, shape: tuple[int, int]
) -> int:
    """How many distinct ``points`` pixels lie within ``radius`` (skimage disk) of a ``target`` pixel.

    Equals the toolkit's ``sum(points_map * cv2.dilate(target_map, disk(radius)))``; the dilation
    runs on the bounding box of ``target`` padded by ``radius`` (clipped to the image), outside
    which it is zero.
    """
    window = _window(target, radius, shape)
    dilated = cv2.dilate(_canvas(target, window), disk_kernel(radius))
    return int(np.count_nonzero(_canvas(points, window) & dilated))


def _count_distinct(points: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]) -> int:
    if len(points[0]) == 0:
        return 0
    return int(np.count_nonzero(_canvas(points, _window(points, 0, shape))))


def _f_from_points(
    fg: tuple[np.ndarray, np.ndarray], gt: tuple[np.ndarray, np.ndarray], radius: int, shape: tuple[int, int]
) -> float:
    """Boundary F from the predicted and GT boundary pixels (toolkit ``f_measure`` arithmetic)."""
    n_fg, n_gt = _count_distinct(fg, shape), _count_distinct(gt, shape)
    # Toolkit special cases: both empty -> F 1; exactly one empty -> F 0.
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0
    precision = _hits_within(fg, gt, radius, shape) / float(n_fg)
    recall = _hits_within(gt, fg, radius, shape) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def f_measure(foreground_mask: np.ndarray, gt_mask: np.ndarray, bound_th: float = BOUNDARY_TH) -> float:
    """Boundary F of one binary prediction against one binary GT mask ``(H, W)``."""
    if foreground_mask.shape != gt_mask.shape or foreground_mask.ndim != 2:
        raise ValueError(f"expected two (H, W) masks, got {foreground_mask.shape} and {gt_mask.shape}")
    radius = boundary_tolerance(gt_mask.shape, bound_th)
    return _f_from_points(np.nonzero(seg2bmap(foreground_mask)), np.nonzero(seg2bmap(gt_mask)), radius, gt_mask.shape)


def db_eval_boundary(annotation: np.ndarray, segmentation: np.ndarray, bound_th: float = BOUNDARY_TH):
    """Toolkit ``db_eval_boundary``: F for ``(H, W)`` masks, or per frame for ``(T, H, W)``."""
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} differ")
    if annotation.ndim == 2:
        return f_measure(segmentation, annotation, bound_th)
    if annotation.ndim == 3:
        return np.array([f_measure(s, a, bound_th) for s, a in zip(segmentation, annotation)])
    raise ValueError(f"db_eval_boundary does not support {annotation.ndim}-d arrays")


# ----------------------------------------------------------------------------------------------
# DAVIS: all objects of one frame, and per-object statistics
# ----------------------------------------------------------------------------------------------


def davis_frame_scores(
    gt_ids: np.ndarray, pred_ids: np.ndarray, n_objects: int, bound_th: float = BOUNDARY_TH
) -> tuple[np.ndarray, np.ndarray]:
    """J and F of objects ``1..n_objects`` in one frame from two ``(H, W)`` id maps.

    ``gt_ids`` must already have the void label (255) zeroed; GT ids above ``n_objects`` (objects
    not in the first frame) belong to no object, as in the toolkit. Predicted ids must be
    ``<= n_objects`` (the caller reports the offending file). Returns two ``(n_objects,)`` arrays.
    """
    if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
        raise ValueError(f"expected two (H, W) id maps, got {gt_ids.shape} and {pred_ids.shape}")
    k = int(n_objects)
    if k == 0:
        return np.zeros(0), np.zeros(0)
    gt = np.where(gt_ids <= k, gt_ids, 0)
    pred = pred_ids
    if pred.min() < 0 or pred.max() > k:
        raise ValueError(f"predicted ids must lie in 0..{k}, found {pred.min()}..{pred.max()}")

    # J for every object from one (K+1)x(K+1) histogram: rows GT id, columns predicted id.
    index = gt.astype(np.intp) * (k + 1) + pred
    hist = np.bincount(index.ravel(), minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
    inter = np.diag(hist)[1:].astype(np.float64)
    union = hist.sum(axis=1)[1:] + hist.sum(axis=0)[1:] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        j = np.where(union == 0, 1.0, inter / union)

    # F: sparse boundaries of every object from one pass over each id map.
    radius = boundary_tolerance(gt_ids.shape, bound_th)
    gt_b = boundary_points(gt, k)
    fg_b = boundary_points(pred, k)
    f = np.array([_f_from_points(fg_b[i], gt_b[i], radius, gt_ids.shape) for i in range(k)])
    return j, f


def decay_bin_edges(n: int, uint8_bins: bool = True) -> np.ndarray:
    """Bin edges of the Decay statistic: ``round(linspace(1, n, 5)) - 1``.

    With ``uint8_bins`` (toolkit parity) the edges are cast to uint8 as the toolkit does, so they
    wrap modulo 256 past 256 frames (the wrap is made explicit here: a float->uint8 cast of an
    out-of-range value is undefined in C and wraps on x86).
    """
    ids = np.round(np.linspace(1, n, 5) + 1e-10) - 1
    ids = ids.astype(np.int64)
    if uint8_bins:
        ids = ids % 256
    return ids


def db_statistics(per_frame_values: np.ndarray, uint8_bins: bool = True) -> tuple[float, float, float]:
    """Per-object (Mean, Recall, Decay) of the toolkit.

    Mean = nanmean; Recall = fraction of frames with value > 0.5; Decay = mean of the first quarter
    minus mean of the last quarter (bins from :func:`decay_bin_edges`, overlapping at the edges).
    """
    values = np.asarray(per_frame_values, dtype=np.float64)
    ids = decay_bin_edges(len(values), uint8_bins)
    bins = [values[ids[i] : ids[i + 1] + 1] for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


DAVIS_GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def davis_global(j_stats: np.ndarray, f_stats: np.ndarray) -> dict[str, float]:
    """Global DAVIS row from per-object statistics ``(n_objects, 3)`` (M, R, D) for J and F.

    Every object weighs the same (not frames, not sequences); J&F = (J-Mean + F-Mean) / 2.
    """
    j_stats = np.asarray(j_stats, dtype=np.float64).reshape(-1, 3)
    f_stats = np.asarray(f_stats, dtype=np.float64).reshape(-1, 3)
    jm, jr, jd = j_stats.mean(axis=0)
    fm, fr, fd = f_stats.mean(axis=0)
    values = ((jm + fm) / 2.0, jm, jr, jd, fm, fr, fd)
    return {name: float(v) for name, v in zip(DAVIS_GLOBAL_COLUMNS, values)}


# ----------------------------------------------------------------------------------------------
# VIP: confusion matrix and IoU
# ----------------------------------------------------------------------------------------------


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n_classes: int = VIP_NUM_CLASSES) -> np.ndarray:
    """``(n, n)`` int64 histogram, rows = GT class, columns = predicted class (``fast_hist``).

    GT values outside ``[0, n)`` are ignored. Predictions must lie in ``[0, n)``: the reference's
    flat bincount would silently shift an out-of-range prediction into the next GT row.
    """
    gt = np.asarray(gt).astype(np.int64).ravel()
    pred = np.asarray(pred).astype(np.int64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred differ in size: {gt.size} vs {pred.size}")
    if pred.size and (pred.min() < 0 or pred.max() >= n_classes):
        raise ValueError(f"predicted classes must lie in 0..{n_classes - 1}, found {pred.min()}..{pred.max()}")
    keep = (gt >= 0) & (gt < n_classes)
    return np.bincount(n_classes * gt[keep] + pred[keep], minlength=n_classes**2).reshape(n_classes, n_classes)


def iou_from_confusion(hist: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (GT + Pred - TP); NaN for a class absent from both GT and prediction."""
    hist = np.asarray(hist, dtype=np.float64)
    tp = np.diag(hist)
    union = hist.sum(axis=1) + hist.sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / union


def mean_iou(hist: np.ndarray) -> float:
    """nanmean of the per-class IoU (background included), as a fraction."""
    iou = iou_from_confusion(hist)
    if np.all(np.isnan(iou)):
        return float("nan")
    return float(np.nanmean(iou))


# ----------------------------------------------------------------------------------------------
# JHMDB: PCK
# ----------------------------------------------------------------------------------------------


def joint_visibility(pred: np.ndarray) -> np.ndarray:
    """``(15, T)`` bool: a predicted joint is visible unless its x is negative or a coordinate NaN.

    The reference decides visibility from the prediction's x coordinate only (``< 0``); NaN is the
    other way a method may mark a joint it could not place.
    """
    pred = np.asarray(pred, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ~((pred[0] < 0) | np.isnan(pred).any(axis=0))


def pck_normalizers(gt: np.ndarray, visible: np.ndarray, scale: float = PCK_BOX_SCALE) -> np.ndarray:
    """``(T,)``: ``scale`` x diagonal of the box of the visible GT joints in each frame.

    Frames without a visible joint get the reference's value from its 1e6 / -1 sentinels (unused:
    such frames contribute no distance).
    """
    gt = np.asarray(gt, dtype=np.float64)
    x = np.where(visible, gt[0], np.nan)
    y = np.where(visible, gt[1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        minx = np.fmin(np.nanmin(x, axis=0), 1e6)
        miny = np.fmin(np.nanmin(y, axis=0), 1e6)
        maxx = np.fmax(np.nanmax(x, axis=0), -1)
        maxy = np.fmax(np.nanmax(y, axis=0), -1)
    return scale * np.hypot(maxx - minx, maxy - miny)


def pck_distances(
    gt: np.ndarray, pred: np.ndarray, exclude_first: bool = True, scale: float = PCK_BOX_SCALE
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized joint distances of one video.

    ``gt`` and ``pred`` are ``(2, 15, T)`` in the same pixel frame (both 1-based or both 0-based).
    Returns ``(dist, scored)``, both ``(15, T)``: ``dist`` = Euclidean distance / per-frame
    normalizer; ``scored`` = visible in the prediction and not frame 0 (the first frame is the
    given label). A zero normalizer gives inf or NaN, which the reference counts as a miss.
    """
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.shape != pred.shape or gt.ndim != 3 or gt.shape[0] != 2:
        raise ValueError(f"expected two (2, J, T) arrays of the same shape, got {gt.shape} and {pred.shape}")
    visible = joint_visibility(pred)
    norm = pck_normalizers(gt, visible, scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = np.hypot(pred[0] - gt[0], pred[1] - gt[1]) / norm[None, :]
    scored = visible.copy()
    if exclude_first:
        scored[:, 0] = False
    return dist, scored


def pck_per_joint(distances: list[np.ndarray], thresholds=PCK_THRESHOLDS) -> np.ndarray:
    """``(len(thresholds), n_joints)`` PCK in %: share of pooled distances <= alpha per joint.

    ``distances[j]`` holds every scored normalized distance of joint ``j`` over all videos. A joint
    never scored gives NaN (the reference would divide by zero).
    """
    out = np.full((len(thresholds), len(distances)), np.nan)
    for j, d in enumerate(distances):
        d = np.asarray(d, dtype=np.float64)
        if d.size == 0:
            continue
        with np.errstate(invalid="ignore"):
            out[:, j] = [100.0 * np.count_nonzero(d <= a) / d.size for a in thresholds]
    return out


def pck_mean(per_joint: np.ndarray) -> np.ndarray:
    """Unweighted mean over joints (the reported PCK), ignoring joints never scored."""
    per_joint = np.asarray(per_joint, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(per_joint, axis=-1)
