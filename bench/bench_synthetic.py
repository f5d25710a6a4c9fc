"""Benchmark the synthetic-data generator (pipeline.data.synthetic, textures in pipeline.data.sprites).

Two tables:
1. Wall and CPU time (CPU time is the figure to read on a shared machine), throughput and the process's peak RSS so far of generating each dataset at its config
   defaults (``data.synthetic.*``; ``--fraction`` scales the item counts down).
2. The texture generator, which dominates the cost, against a straightforward version run in the
   same process (full-array ``sin``, percentile normalization, float64 Gaussian grain, per-pixel
   ramp interpolation): microseconds per texture and the speed-up.

    OMP_NUM_THREADS=1 python -m bench.bench_synthetic [--fraction 1.0] [--datasets davis vip]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from bench.common import measure, print_table, process_peak_mib
from pipeline.config import section_defaults
from pipeline.data import sprites, synthetic

COUNT_KEYS = {
    "imagenet": "images_per_class",
    "videos": "count",
    "davis": "sequences",
    "vip": "videos",
    "jhmdb": "videos_per_class",
}


def baseline_texture(rng, h, w, scale=1.0):
    """The straightforward texture: same recipe, no lookup tables or separable grating."""
    field = sprites.smooth_noise(rng, h, w, rng.uniform(10, 24) * scale) + 0.6 * sprites.smooth_noise(
        rng, h, w, rng.uniform(2.5, 5) * scale
    )
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14) * scale
    grating = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi))
    field = field + rng.uniform(0, 1.2) * grating
    lo, hi = np.percentile(field, [2, 98])
    field = np.clip((field - lo) / max(hi - lo, 1e-6), 0, 1)
    colors = rng.uniform(15, 240, size=(int(rng.integers(3, 5)), 3))
    pos = field * (len(colors) - 1)
    i0 = np.minimum(pos.astype(np.int64), len(colors) - 2)
    frac = (pos - i0)[..., None]
    rgb = colors[i0] * (1 - frac) + colors[i0 + 1] * frac + rng.normal(0, 5, (h, w, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def bench_generate(names, fraction):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = section_defaults("data", "synthetic", name)
            cfg[COUNT_KEYS[name]] = max(1, round(cfg[COUNT_KEYS[name]] * fraction))
            with measure() as m:
                manifest = synthetic.generate(name, Path(tmp) / name, cfg, seed=0)
            dt, cpu, peak = m.seconds, m.cpu_seconds, process_peak_mib()  # the process's peak so far
            counts = manifest["counts"]
            n = counts.get("images") or counts.get("frames")
            size = sum(p.stat().st_size for p in (Path(tmp) / name).rglob("*") if p.is_file())
            rows.append([name, n, f"{dt:.2f}", f"{cpu:.2f}", f"{n / dt:.1f}", f"{peak:.1f}", f"{size / 2**20:.1f}"])
    print_table(["dataset", "frames", "wall s", "CPU s", "frames/s", "max RSS MiB", "disk MiB"], rows)


def bench_texture(sizes=((160, 160), (160, 288), (40, 40)), repeats=100):
    rows = []
    for h, w in sizes:
        times = {}
        for label, fn in (("ours", sprites.make_texture), ("baseline", baseline_texture)):
            rng = np.random.default_rng(0)
            fn(rng, h, w)  # warm-up
            with measure() as m:
                for _ in range(repeats):
                    fn(rng, h, w)
            times[label] = m.seconds / repeats * 1e6
        rows.append(
            [f"{h}x{w}", f"{times['ours']:.0f}", f"{times['baseline']:.0f}", f"{times['baseline'] / times['ours']:.2f}"]
        )
    print()
    print_table(["texture", "ours µs", "baseline µs", "speed-up"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(synthetic.DATASETS), choices=synthetic.DATASETS)
    ap.add_argument(
        "--fraction", type=float, default=1.0, help="scale of the item counts relative to the config defaults"
    )
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    bench_generate(args.datasets, args.fraction)
    bench_texture()


if __name__ == "__main__":
    main()
