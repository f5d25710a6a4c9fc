"""Training-input throughput per CPU core: read + JPEG decode + augment of CDG-MAE samples from a bag.

    OMP_NUM_THREADS=1 python -m bench.bench_loader [--rows 64 --size 256 --img-size 224 --samples 200 --core 0]

One process pinned to one core (``sched_setaffinity``), one torch and one OpenCV thread — what one
DataLoader worker gets. A bag of ``--rows`` rows (1 real image + 4 views, ``--size`` px, JPEG q95, the
views stage's layout and writer) of synthetic ImageNet-like stills is written to a temporary folder.
Samples are built by the training code path (``strategies.build_dataset`` with the ``pretrain``
schema defaults at ``--img-size``, target ``either``) for a1 and a3:

- ours: ``BagViewsDataset`` over ``BagDataset``, which decodes only the 1 + N images a sample uses;
- baseline: the same dataset over a reader that decodes all 5 images of the row (the path before
  selective decoding). Outputs are checked identical before timing.

Interleaved best-of-``--repeats``. Prints samples/s per core, the speed-up, and the cores per GPU
needed to feed ``--target-rate`` samples/s; then where the time of an ours-sample goes (HDF5 row
reads, JPEG decodes, augmentation), and per decoder (OpenCV two ways, PIL) the ms per image on the
same blobs, whether its arrays equal `decode_jpeg`'s, and the a3 rate with `BagDataset` using it.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from PIL import Image

import pipeline.views.bag as bag_module
from bench.common import interleaved_seconds, print_table, print_table_header, print_table_row
from pipeline.data.synthetic import _imagenet_still
from pipeline.devices import set_threads
from pipeline.io import record_digest
from pipeline.pretrain.strategies import build_dataset
from pipeline.pretrain.train import resolve_pretrain_settings
from pipeline.views.bag import BagDataset
from pipeline.views.hdf5 import decode_jpeg, encode_jpeg, write_rows

N_VIEWS = 4


class DecodeAllBag:
    """The reader before selective decoding: every item decodes the real image and all M views."""

    def __init__(self, bag: BagDataset):
        self.bag = bag

    def __len__(self) -> int:
        return len(self.bag)

    def __getitem__(self, i: int) -> dict:
        return self.bag[i]


def write_bench_bag(path: Path, rows: int, size: int) -> Path:
    """A complete bag of synthetic stills (a distinct still per real image and per view)."""
    rng = np.random.default_rng(0)
    stills = [
        [encode_jpeg(_imagenet_still(rng, size, (r * 5 + k) % 8, 0), 95) for k in range(1 + N_VIEWS)]
        for r in range(rows)
    ]
    with h5py.File(path, "w") as f:
        ids = [f"c/{r:05d}" for r in range(rows)]
        write_rows(
            f, [s[0] for s in stills], [s[1:] for s in stills], ids, list(range(rows)), [[0] * N_VIEWS] * rows, N_VIEWS
        )
        f.attrs.update(
            complete=True,
            expected_rows=rows,
            generator="bench",
            is_baseline=True,
            n_views=N_VIEWS,
            settings=json.dumps({}),
        )
    record_digest(path)
    return path


def best_rate(fns: dict, n: int, repeats: int) -> dict:
    """Best-of-``repeats`` calls per CPU-second of each ``fn(k)`` over ``n`` calls (one thread:
    CPU time is the core's time, not the other jobs'), interleaved round by round so load
    changes on a shared machine hit all alike."""
    for fn in fns.values():
        fn(0)  # warm-up: first allocations, HDF5 handle
    calls = {name: (lambda fn=fn: [fn(k) for k in range(n)]) for name, fn in fns.items()}
    return {name: n / min(s) for name, s in interleaved_seconds(calls, repeats, clock=time.process_time).items()}


def pin_to_one_core(core: int) -> None:
    os.sched_setaffinity(0, {core})
    set_threads(1)
    cv2.setNumThreads(1)


def throughput_table(path: Path, args) -> list[tuple]:
    """(anchors, baseline rate, ours rate) for a1 and a3, outputs checked identical first."""
    settings = resolve_pretrain_settings({"img_size": args.img_size})
    rows = []
    for anchors in (1, 3):
        cell = {"method": "cdgmae", "anchors": anchors, "target": "either"}
        ours = build_dataset(cell, settings, seed=0, bag=str(path))
        base = build_dataset(cell, settings, seed=0, bag=DecodeAllBag(BagDataset(path)))
        n = len(ours)
        for k in range(min(n, 16)):
            if not torch.equal(ours[(0, k)], base[(0, k)]):
                raise AssertionError(f"a{anchors}: sample {k} differs between selective and decode-all reading")
        timed = {"base": lambda k, ds=base: ds[(0, k % len(ds))], "ours": lambda k, ds=ours: ds[(0, k % len(ds))]}
        rate = best_rate(timed, args.samples, args.repeats)
        rows.append((anchors, rate["base"], rate["ours"]))
    return rows


def time_parts(path: Path, args) -> dict:
    """Per-sample ms of an a3 sample's parts: HDF5 reads of its 4 blobs, their decodes, the rest."""
    settings = resolve_pretrain_settings({"img_size": args.img_size})
    ds = build_dataset({"method": "cdgmae", "anchors": 3, "target": "either"}, settings, seed=0, bag=str(path))
    n = len(ds)
    with h5py.File(path, "r") as f:
        blobs = [f["views"][r][k] for r in range(n) for k in range(3)] + [f["real"][r] for r in range(n)]
    which = [[0, 1, 2, 3], [1, 2, 3, 4], [2, 0, 3, 4]]
    rate = best_rate(
        {
            "sample": lambda k: ds[(0, k % n)],
            "read+decode": lambda k: ds.bag.read(k % n, which[k % 3]),
            "decode": lambda k: [decode_jpeg(blobs[(4 * k + j) % len(blobs)]) for j in range(4)],
        },
        args.samples,
        args.repeats,
    )
    ms = {name: 1e3 / r for name, r in rate.items()}
    return {
        "HDF5 row reads (4 blobs)": ms["read+decode"] - ms["decode"],
        "JPEG decode (4 images)": ms["decode"],
        "augment (match size, 4 crops, flip, normalize)": ms["sample"] - ms["read+decode"],
        "whole sample": ms["sample"],
    }


def cv2_bgr_then_rgb_in_place(blob) -> np.ndarray:
    img = cv2.imdecode(np.asarray(blob, dtype=np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)


def cv2_rgb(blob) -> np.ndarray:
    return cv2.imdecode(np.asarray(blob, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)


def pil_rgb(blob) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(np.asarray(blob).tobytes())).convert("RGB"))


DECODERS = {
    "`hdf5.decode_jpeg` (cv2 BGR, then `[..., ::-1].copy()`)": decode_jpeg,
    "cv2 BGR, then in-place `cvtColor(BGR2RGB, dst=img)`": cv2_bgr_then_rgb_in_place,
    "cv2 `IMREAD_COLOR_RGB` (OpenCV >= 4.11)": cv2_rgb,
    "PIL `Image.open().convert('RGB')`": pil_rgb,
}


def decoder_table(path: Path, args) -> dict:
    """Per decoder: ms per image on the bag's blobs, whether its arrays are identical to
    ``decode_jpeg``'s, and the a3 samples/s per core of ``BagDataset`` decoding with it (what the
    loader would do with that decoder; ``pipeline.views.bag.decode_jpeg`` swapped for the run)."""
    with h5py.File(path, "r") as f:
        blobs = [np.asarray(b) for b in f["real"][:]]
    settings = resolve_pretrain_settings({"img_size": args.img_size})
    ds = build_dataset({"method": "cdgmae", "anchors": 3, "target": "either"}, settings, seed=0, bag=str(path))
    per_image = best_rate(
        {name: lambda k, fn=fn: fn(blobs[k % len(blobs)]) for name, fn in DECODERS.items()}, args.samples, args.repeats
    )
    table = {}
    for name, fn in DECODERS.items():
        same = all(np.array_equal(fn(b), decode_jpeg(b)) for b in blobs)
        bag_module.decode_jpeg = fn
        try:
            a3 = best_rate({"a3": lambda k: ds[(0, k % len(ds))]}, args.samples, args.repeats)["a3"]
        finally:
            bag_module.decode_jpeg = decode_jpeg
        table[name] = (1e3 / per_image[name], same, a3)
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument(
        "--size", type=int, default=256, help="side of the stored images (the paper preset's views.image_size)"
    )
    ap.add_argument("--img-size", type=int, default=224, help="training crop side")
    ap.add_argument("--samples", type=int, default=200, help="samples per timed round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--core", type=int, default=0, help="CPU to pin to")
    ap.add_argument("--target-rate", type=float, default=3000.0, help="samples/s one GPU consumes")
    args = ap.parse_args(argv)
    pin_to_one_core(args.core)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bench_bag(Path(tmp) / "bag.h5", args.rows, args.size)
        kb = os.path.getsize(path) / args.rows / (1 + N_VIEWS) / 1e3
        print(
            f"bag: {args.rows} rows x (1 + {N_VIEWS}) JPEG q95 {args.size} px (~{kb:.0f} kB each) -> {args.img_size} px crops;"
        )
        print(
            f"one process pinned to core {args.core}, 1 torch + 1 OpenCV thread; CPU time, best of {args.repeats} x {args.samples}"
        )
        print()
        print_table_header(
            [
                "sample",
                "reader",
                "samples/s per core",
                "ms / sample",
                "speed-up",
                f"cores per GPU at {args.target_rate:.0f}/s",
            ]
        )
        for anchors, base, ours in throughput_table(path, args):
            for name, rate in (("decode all 5 (baseline)", base), (f"decode the {1 + anchors} used", ours)):
                cores = math.ceil(args.target_rate / rate)
                print_table_row([f"a{anchors}", name, f"{rate:.0f}", f"{1e3 / rate:.2f}", f"{rate / base:.2f}", cores])
        print("\nWhere an a3 sample's time goes (ms):\n")
        print_table(["part", "ms"], [[part, f"{ms:.2f}"] for part, ms in time_parts(path, args).items()])
        print("\nJPEG decoders on the bag's real images, and a3 through BagDataset with each:\n")
        print_table_header(
            ["decoder", "ms / image", "identical to decode_jpeg", "a3 samples/s per core", "cores per GPU"]
        )
        for name, (ms, same, a3) in decoder_table(path, args).items():
            cores = math.ceil(args.target_rate / a3)
            print_table_row([name, f"{ms:.3f}", "yes" if same else "no", f"{a3:.0f}", cores])


if __name__ == "__main__":
    main()
