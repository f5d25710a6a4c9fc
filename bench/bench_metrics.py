"""Benchmark the DAVIS per-frame scorer against a straightforward toolkit-style implementation.

Both run in this process on the same synthetic 480x880 frames (elliptic objects, predictions
shifted, grown and speckled). Two scenes: smooth predictions (shifted, rescaled ellipses, like propagated masks) and speckled
ones (0.05 % of pixels set to random ids, the worst case for bounding-box cropping). The baseline
is the official davis2017-evaluation recipe: one object
at a time, full-frame boolean masks, `_seg2bmap` and two full-frame `cv2.dilate` per object-frame.
The table prints ms per object-frame, the speed-up, peak memory (``bench.common.measure``), and
the largest absolute difference between the two (must be 0).

    OMP_NUM_THREADS=1 python -m bench.bench_metrics [--frames 40 --objects 3 --size 480 880]
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import measure, print_table
from pipeline.propagation import metrics


def baseline_frame(gt_ids, pred_ids, n_objects, bound_th=metrics.BOUNDARY_TH):
    """Toolkit recipe: per object, full-frame masks, full-frame dilations."""
    import cv2
    from skimage.morphology import disk

    j = np.zeros(n_objects)
    f = np.zeros(n_objects)
    for i in range(n_objects):
        gt = gt_ids == i + 1
        pred = pred_ids == i + 1
        inter = np.sum(gt & pred)
        union = np.sum(gt | pred)
        j[i] = 1.0 if union == 0 else inter / union
        bound_pix = np.ceil(bound_th * np.linalg.norm(gt.shape))
        fg_b = metrics.seg2bmap(pred)
        gt_b = metrics.seg2bmap(gt)
        kernel = disk(bound_pix).astype(np.uint8)
        fg_dil = cv2.dilate(fg_b.astype(np.uint8), kernel)
        gt_dil = cv2.dilate(gt_b.astype(np.uint8), kernel)
        n_fg, n_gt = np.sum(fg_b), np.sum(gt_b)
        if n_fg == 0 and n_gt > 0:
            p, r = 1.0, 0.0
        elif n_fg > 0 and n_gt == 0:
            p, r = 0.0, 1.0
        elif n_fg == 0 and n_gt == 0:
            p, r = 1.0, 1.0
        else:
            p = np.sum(fg_b * gt_dil) / float(n_fg)
            r = np.sum(gt_b * fg_dil) / float(n_gt)
        f[i] = 0.0 if p + r == 0 else 2 * p * r / (p + r)
    return j, f


def make_frames(n_frames, n_objects, h, w, speckle=0.0, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    frames = []
    for _ in range(n_frames):
        gt = np.zeros((h, w), np.uint8)
        pred = np.zeros((h, w), np.uint8)
        for k in range(1, n_objects + 1):
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.05, 0.25) * h, rng.uniform(0.05, 0.2) * w
            gt[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = k
            dy, dx, s = rng.normal(0, 6), rng.normal(0, 6), rng.uniform(0.9, 1.1)
            pred[((yy - cy - dy) / (ry * s)) ** 2 + ((xx - cx - dx) / (rx * s)) ** 2 < 1] = k
        noisy = rng.random((h, w)) < speckle
        pred[noisy] = rng.integers(0, n_objects + 1, noisy.sum())
        frames.append((gt, pred))
    return frames


def run(fn, frames, n_objects):
    """(scores, seconds, peak MiB) of ``fn`` over every frame."""
    with measure() as m:
        out = [fn(gt, pred, n_objects) for gt, pred in frames]
    return out, m.seconds, m.peak_mib


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--size", type=int, nargs=2, default=(480, 880), metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; the fastest is reported")
    ap.add_argument("--cv-threads", type=int, default=1, help="cv2.setNumThreads for both implementations")
    args = ap.parse_args(argv)
    import cv2

    cv2.setNumThreads(args.cv_threads)
    n = args.frames * args.objects
    print(
        f"DAVIS J+F, {args.frames} frames x {args.objects} objects at {args.size[0]}x{args.size[1]}, "
        f"best of {args.repeats}, cv2 threads {args.cv_threads}"
    )
    rows = []
    for scene, speckle in (("smooth", 0.0), ("speckled", 0.0005)):
        frames = make_frames(args.frames, args.objects, *args.size, speckle=speckle)
        run(metrics.davis_frame_scores, frames[:2], args.objects)  # warm-up (imports, kernel cache)
        run(baseline_frame, frames[:2], args.objects)
        t_base = t_fast = float("inf")
        for _ in range(args.repeats):  # interleaved, best of N: robust to other load on the machine
            base, t, m_base = run(baseline_frame, frames, args.objects)
            t_base = min(t_base, t)
            fast, t, m_fast = run(metrics.davis_frame_scores, frames, args.objects)
            t_fast = min(t_fast, t)
        diff = max(float(np.max(np.abs(np.r_[a[0] - b[0], a[1] - b[1]]))) for a, b in zip(base, fast))
        rows.append(
            [
                scene,
                "toolkit recipe (baseline)",
                f"{1e3 * t_base / n:.2f}",
                f"{n / t_base:.1f}",
                f"{m_base:.1f}",
                "1.00",
                "",
            ]
        )
        rows.append(
            [scene, "`metrics.davis_frame_scores`", f"{1e3 * t_fast / n:.2f}", f"{n / t_fast:.1f}", f"{m_fast:.1f}"]
            + [f"{t_base / t_fast:.2f}", f"{diff:.3g}"]
        )
    header = [
        "scene",
        "implementation",
        "ms / object-frame",
        "object-frames/s",
        "peak MiB",
        "speed-up",
        "max \\|diff\\|",
    ]
    print_table(header, rows)


if __name__ == "__main__":
    main()
