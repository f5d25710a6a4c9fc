"""Benchmark label propagation (pipeline.propagation.algorithm) against the reference's straightforward design.

On the synthetic DAVIS (``pipeline.data.synthetic.make_davis`` at ``--size``), for each patch size
(/16 with ``vit_small_patch16``, /8 with ``vit_small_patch8``, random-init weights: speed does not
depend on them), both implementations run in the same process on the same frames:

- ours: features once per real frame (kept on the device), ``propagate`` (one affinity product
  per query chunk against the stacked unique context frames, precomputed boolean radius mask,
  frame 0's masked top-k reused for its duplicate slots);
- baseline: the reference's design — ``queue`` padded copies of frame 0 encoded too, then
  ``propagate_reference`` of ``tests/propagation_reference.py`` (host key bank gathered per
  2-frame chunk, 100-query-cell chunks, additive -1e10 mask, top-k over the slot axis).

Printed per grid: feature and propagation seconds, frames/s (real frames over both), peak memory
of the propagation call (``bench.common.measure``: above the memory before it; CPU: peak RSS,
GPU: torch's peak allocated), speed-up, and the largest difference of the soft
predictions (must be ~1e-6).

    OMP_NUM_THREADS=2 python -m bench.bench_propagation [--size 240 448 --sequences 2 --frames 24]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench.common import measure, print_table
from pipeline.devices import resolve_device
from pipeline.propagation import algorithm as A
from pipeline.propagation import run as propagation_run

# the baseline is the tests' oracle: the reference's straightforward algorithm is no part of the package
from tests.propagation_reference import propagate_reference

ARCHS = {16: "vit_small_patch16", 8: "vit_small_patch8"}


def _measure(fn, device):
    """(result, seconds, peak MiB) of ``fn()`` (``bench.common.measure``)."""
    with measure(device) as m:
        out = fn()
    return out, m.seconds, m.peak_mib


def _sequence_inputs(root: Path, hw):
    import cv2

    from pipeline.data.readers import DavisDataset, read_rgb

    ds = DavisDataset(root)
    for seq in ds.sequences:
        frames = [propagation_run.load_frame(read_rgb(p), hw)[0] for p in ds.frames(seq)]
        gt = ds.read_annotation(ds.annotations(seq)[0])
        ids = cv2.resize(gt, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
        yield seq, frames, ids


def _measure_sequence(encoder, frames, labels0, grid, args, device):
    """((predictions, feature s, propagation s, peak MiB) of ours, the same of the baseline) on one sequence."""
    import torch

    kw = dict(topk=args.topk, temperature=0.7, radius=args.radius, queue=args.queue)
    with torch.inference_mode():
        feats, t_feat, _ = _measure(lambda: propagation_run.encode_frames(encoder, frames, 5, device), device)
        ours, t_prop, peak = _measure(
            lambda: A.propagate(feats, labels0, grid, query_chunk=args.query_chunk, **kw), device
        )
        # baseline: the padded copies of frame 0 are encoded as well, features moved to the host
        padded = [frames[0]] * args.queue + frames
        pfeats, b_feat, _ = _measure(lambda: propagation_run.encode_frames(encoder, padded, 5, device).cpu(), device)
        base, b_prop, b_peak = _measure(lambda: propagate_reference(pfeats[args.queue :], labels0, grid, **kw), device)
    return (ours, t_feat, t_prop, peak), (base, b_feat, b_prop, b_peak)


def bench_grid(patch: int, root: Path, hw, args, device) -> list[dict]:
    import torch

    from pipeline.pretrain.models_mae import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(ARCHS[patch], 224).to(device).eval()
    grid = A.grid_size(hw, patch)
    totals = {name: dict(feat=0.0, prop=0.0, peak=0.0, frames=0, diff=0.0) for name in ("ours", "baseline")}
    for seq, frames, ids in _sequence_inputs(root, hw):
        label_set = np.unique(ids).tolist()
        labels0 = torch.from_numpy(A.segmentation_labels(ids, label_set, grid)).reshape(-1, len(label_set))
        (ours, t_feat, t_prop, peak), (base, b_feat, b_prop, b_peak) = _measure_sequence(
            encoder, frames, labels0, grid, args, device
        )
        diff = float((ours.cpu() - base).abs().max())
        for name, tf, tp, pk in (("ours", t_feat, t_prop, peak), ("baseline", b_feat, b_prop, b_peak)):
            tot = totals[name]
            tot["feat"] += tf
            tot["prop"] += tp
            tot["peak"] = max(tot["peak"], pk)
            tot["frames"] += len(frames)
            tot["diff"] = max(tot["diff"], diff)
        print(
            f"  /{patch} {seq}: {len(frames)} frames, ours {t_feat:.2f}+{t_prop:.2f} s, "
            f"baseline {b_feat:.2f}+{b_prop:.2f} s, max |diff| {diff:.2e}",
            flush=True,
        )
    rows = []
    base_fps = None
    for name in ("baseline", "ours"):
        tot = totals[name]
        fps = tot["frames"] / (tot["feat"] + tot["prop"])
        prop_fps = tot["frames"] / tot["prop"]
        base_fps = base_fps or (fps, prop_fps)
        rows.append(
            dict(
                grid=f"/{patch} {grid[0]}x{grid[1]}",
                impl=name,
                feat_s=tot["feat"],
                prop_s=tot["prop"],
                fps=fps,
                prop_fps=prop_fps,
                peak=tot["peak"],
                speedup=fps / base_fps[0],
                prop_speedup=prop_fps / base_fps[1],
                diff=tot["diff"],
            )
        )
    return rows


def main(argv=None) -> None:
    import torch

    from pipeline.data.synthetic import make_davis
    from pipeline.devices import set_threads

    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_propagation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size", type=int, nargs=2, default=[240, 448], metavar=("H", "W"))
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--patches", type=int, nargs="+", default=[16, 8], choices=sorted(ARCHS))
    ap.add_argument("--queue", type=int, default=20)
    ap.add_argument("--topk", type=int, default=7)
    ap.add_argument("--radius", type=float, default=20)
    ap.add_argument("--query-chunk", type=int, default=4096)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    device = args.device or resolve_device()
    hw = tuple(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "davis"
        make_davis(
            root, dict(sequences=args.sequences, frames=args.frames, height=hw[0], width=hw[1], max_objects=3), 0
        )
        rows = []
        for patch in args.patches:
            rows += bench_grid(patch, root, hw, args, device)
    print(
        f"\ndevice {device}, torch threads {torch.get_num_threads()}, input {hw[0]}x{hw[1]}, "
        f"{args.sequences} x {args.frames} frames, queue {args.queue}, top-k {args.topk}, "
        f"radius {args.radius:g}"
    )
    header = ["grid", "implementation", "features s", "propagation s", "frames/s", "propagation frames/s"]
    header += ["peak MiB (propagation)", "speed-up", "propagation speed-up", "max abs diff"]
    print_table(
        header,
        [
            [
                r["grid"],
                r["impl"],
                f"{r['feat_s']:.2f}",
                f"{r['prop_s']:.2f}",
                f"{r['fps']:.2f}",
                f"{r['prop_fps']:.2f}",
            ]
            + [f"{r['peak']:.0f}", f"{r['speedup']:.2f}", f"{r['prop_speedup']:.2f}", f"{r['diff']:.1e}"]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
