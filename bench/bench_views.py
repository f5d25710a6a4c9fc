"""Benchmark of the bag-of-views stage.

1. Generation throughput (images/s) of the stage's ``generate`` code path (``ShardWriter.run``:
   source decoding, generator, non-finite check, JPEG encoding, atomic HDF5 parts, shard assembly)
   against a straightforward baseline run in the same process on the same images: decode the
   sources and call the same generator on the same batches with the same seeds, keeping the views
   in memory. The stage's overhead is the ratio minus one (target < 5%).
2. Read throughput (bags/s) of ``BagDataset`` through a DataLoader with 0 and N workers.

    OMP_NUM_THREADS=1 python -m bench.bench_views --generators warp sd-variation --images 256 --workers 2

``sd-variation`` uses the tiny random-weight pipeline of the tests (CPU-sized, 2 DDIM steps by
default), so its numbers measure the stage's plumbing, not a real SD model's speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.common import interleaved_seconds, print_table, process_peak_mib
from pipeline.config import section_defaults
from pipeline.data.readers import list_imagenet
from pipeline.imaging import load_square
from pipeline.views.bag import BagDataset
from pipeline.views.generate import ShardWriter, to_uint8, view_seed
from pipeline.views.generators import build_generator


def make_sources(root: Path, n: int, size: int = 160) -> Path:
    """ImageNet-layout folder of ``n`` smooth random JPEGs (4 classes)."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"n{i % 4:08d}"
        d.mkdir(parents=True, exist_ok=True)
        img = cv2.GaussianBlur(rng.integers(0, 256, (size, size + 32, 3), dtype=np.uint8), (9, 9), 3)
        Image.fromarray(img).save(d / f"img_{i:05d}.JPEG", quality=90)
    return root


def baseline(records, gen, cfg, seed):
    """The straightforward way: decode, generate in batches, keep uint8 views in memory."""
    B, M, S = cfg["batch_size"], cfg["n_views"], cfg["image_size"]
    out = []
    for b0 in range(0, len(records), B):
        batch = records[b0 : b0 + B]
        reals = np.stack([load_square(r.path, S) for r in batch])
        seeds = np.array([[view_seed(seed, r.image_id, m) for m in range(M)] for r in batch])
        out.append(to_uint8(gen.generate(reals, seeds)))
    return out


def bench_generation(name, gen_settings, root, work, args):
    cfg = section_defaults(
        "views",
        overrides={
            "n_views": 4,
            "shards": 1,
            "part_size": args.part_size,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "generators": {name: gen_settings},
        },
    )
    records = list_imagenet(root)
    gen = build_generator(name, cfg["generators"][name], image_size=args.image_size, device=args.device)
    baseline(records[: cfg["batch_size"]], gen, cfg, 0)  # warm-up (first-call allocations)
    run_dirs = []

    def stage():
        run_dir = work / f"{name}-{len(run_dirs)}"
        run_dirs.append(run_dir)
        writer = ShardWriter(
            records,
            name,
            0,
            cfg,
            0,
            run_dir / "shard-0.h5",
            run_dir / "shard-0.rejects.csv",
            run_dir / "parts",
            device=args.device,
        )
        writer._gen = gen  # same loaded model: compare the code paths, not the weight loading
        writer.run()

    # interleaved, best of N: robust to a noisy shared machine
    seconds = interleaved_seconds({"baseline": lambda: baseline(records, gen, cfg, 0), "stage": stage}, args.repeats)
    n = len(records)
    b, s = min(seconds["baseline"]), min(seconds["stage"])
    return {
        "generator": name,
        "images": n,
        "baseline_img_s": n / b,
        "stage_img_s": n / s,
        "overhead_pct": 100 * (s / b - 1),
    }, run_dirs[-1] / "shard-0.h5"


def bench_read(path, workers, repeats):
    import torch

    rows = []
    for w in sorted({0, workers}):
        ds = BagDataset(path)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=16, num_workers=w, collate_fn=list, persistent_workers=w > 0
        )
        for _ in loader:  # warm-up: worker start, page cache
            pass
        (seconds,) = interleaved_seconds({"read": lambda loader=loader: sum(len(b) for b in loader)}, repeats).values()
        rows.append({"workers": w, "bags_s": len(ds) / min(seconds)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generators", nargs="+", default=["warp", "sd-variation"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--part-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps of the tiny sd-variation")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_views_"))
    try:
        root = make_sources(work / "imagenet", args.images)
        gen_rows, read_rows = [], []
        for name in args.generators:
            settings = {}
            if name == "sd-variation":
                from tests.support import build_tiny_sd_variation

                settings = {
                    "model_path": str(build_tiny_sd_variation(work / "sdv")),
                    "steps": args.steps,
                    "dtype": "float32",
                }
            row, shard = bench_generation(name, settings, root, work, args)
            gen_rows.append(row)
            read_rows += [{"generator": name, **r} for r in bench_read(shard, args.workers, args.repeats)]
        print(
            f"\nGeneration: {args.images} images, M=4, {args.image_size}px, batch "
            f"{args.batch_size}, part {args.part_size}, {args.threads} torch thread(s), "
            f"best of {args.repeats}"
        )
        print_table(
            ["generator", "baseline img/s", "stage img/s", "overhead %"],
            [
                [r["generator"], f"{r['baseline_img_s']:.1f}", f"{r['stage_img_s']:.1f}", f"{r['overhead_pct']:.1f}"]
                for r in gen_rows
            ],
        )
        print("\nRead: BagDataset through a DataLoader (batch 16), bags/s")
        print_table(
            ["generator", "workers", "bags/s"],
            [[r["generator"], r["workers"], f"{r['bags_s']:.1f}"] for r in read_rows],
        )
        peak = process_peak_mib()
        print(f"\npeak RSS of the benchmark process: {peak:.0f} MiB")
        print(json.dumps({"generation": gen_rows, "read": read_rows, "peak_rss_mib": peak}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
