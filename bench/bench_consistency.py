"""Benchmark the consistency stage's batched pieces against straightforward per-item baselines.

1. Pair metrics: ``pipeline.consistency.pair_metrics.pair_metrics`` (all pairs as batched matrix products,
   chunked) vs a per-pair Python loop of cosine / nested-max calls (what a first implementation
   writes). Pairs of ViT-B/16-sized token sets (L = 196, C = 768) by default.
2. k-NN: ``pipeline.consistency.neighbours.nearest_neighbours`` (chunked query blocks against the normalized
   bank, top-k) vs the naive full N x N similarity matrix + argsort.
3. Encoders: images/s of sift-grid, hog-grid and a random-init timm ViT (load path = real weights).

Each variant runs in a fresh subprocess; its peak memory is the peak RSS during the timed call
minus the RSS before it (``bench.common.measure``). The table prints the time,
throughput, peak memory, speed-up vs the baseline and the largest absolute difference of the
results (must be ~0).

    OMP_NUM_THREADS=1 python -m bench.bench_consistency [--pairs 500 --tokens 196 --dim 768 --images 8000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

from bench.common import measure, print_table


def _pairs(n, L, C, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ga, gb = torch.randn(n, C, generator=g), torch.randn(n, C, generator=g)
    pa = torch.randn(n, L, C, generator=g)
    pb = pa[:, torch.randperm(L, generator=g)] + 0.5 * torch.randn(n, L, C, generator=g)
    return ga, gb, pa, pb


def baseline_metrics(ga, gb, pa, pb):
    """One pair at a time, one patch at a time for NPS (the formula written literally)."""
    import torch
    import torch.nn.functional as F

    out = []
    for p in range(len(ga)):
        gs = F.cosine_similarity(ga[p], gb[p], dim=0)
        ls = F.cosine_similarity(pa[p], pb[p], dim=1).mean()
        best = [F.cosine_similarity(pa[p][i][None], pb[p], dim=1).max() for i in range(pa.shape[1])]
        out.append(torch.stack([gs, ls, torch.stack(best).mean()]))
    return torch.stack(out)


def baseline_knn(emb, k):
    import torch
    import torch.nn.functional as F

    n = F.normalize(emb, dim=1)
    sim = n @ n.T  # (N, N) at once
    sim.fill_diagonal_(-float("inf"))
    return torch.argsort(sim, dim=1, descending=True)[:, :k]


def _job(name, args, queue):
    import torch

    from pipeline.consistency.neighbours import nearest_neighbours
    from pipeline.consistency.pair_metrics import pair_metrics

    torch.set_num_threads(args.threads)
    if name.startswith("metrics"):
        data = _pairs(args.pairs, args.tokens, args.dim)
        with measure() as m:
            res = pair_metrics(*data) if name == "metrics-batched" else baseline_metrics(*data)
        ref = pair_metrics(*data)
        items = args.pairs
    elif name.startswith("knn"):
        emb = torch.randn(args.images, args.dim, generator=torch.Generator().manual_seed(1))
        with measure() as m:
            res = nearest_neighbours(emb, 5)[0] if name == "knn-chunked" else baseline_knn(emb, 5)
        ref = baseline_knn(emb, 5)
        items = args.images
    else:  # encoder throughput
        from pipeline.consistency.feature_encoders import build_feature_encoder

        kind = name.split(":", 1)[1]
        settings = {"name": kind, "image_size": args.image_size, "patch_size": 16}
        if kind == "timm":
            import tempfile

            import timm

            model = timm.create_model(args.timm_model, pretrained=False, num_classes=0, img_size=args.image_size)
            path = tempfile.mktemp(suffix=".pth")
            torch.save({"model": model.state_dict()}, path)
            settings.update(timm_model=args.timm_model, checkpoint=path)
        enc = build_feature_encoder(settings, "cpu")
        imgs = torch.randint(0, 256, (args.encode_images, args.image_size, args.image_size, 3), dtype=torch.uint8)
        with measure() as m:
            for s in range(0, len(imgs), 32):
                enc.encode(imgs[s : s + 32])
        res = ref = torch.zeros(1)
        items = args.encode_images
    diff = float((res.float() - ref.float()).abs().max())
    queue.put((name, m.seconds, items / m.seconds, m.peak_mib, diff))


def run(name, args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_job, args=(name, args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument(
        "--baseline-pairs",
        type=int,
        default=50,
        help="the per-pair loop is slow: time it on fewer pairs and report per-pair throughput",
    )
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--images", type=int, default=8000, help="k-NN bank size")
    ap.add_argument("--encode-images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--timm-model", default="vit_base_patch16_224")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    rows = []
    base = argparse.Namespace(**{**vars(args), "pairs": args.baseline_pairs})
    rows.append(run("metrics-loop (baseline)", base) + ("",))
    b = run("metrics-batched", args)
    rows.append(b + (f"{b[2] / rows[0][2]:.0f}x",))
    k0 = run("knn-full (baseline)", args)
    rows.append(k0 + ("",))
    k1 = run("knn-chunked", args)
    rows.append(k1 + (f"{k1[2] / k0[2]:.2f}x",))
    for kind in ("sift-grid", "hog-grid", "timm"):
        rows.append(run(f"encode:{kind}", args) + ("",))

    print(
        f"pairs {args.pairs} (baseline {args.baseline_pairs}), L={args.tokens}, C={args.dim}; "
        f"k-NN bank {args.images}x{args.dim}, k=5; encoders at {args.image_size}px; "
        f"{args.threads} threads"
    )
    print_table(
        ["variant", "time s", "items/s", "peak MB", "max \\|diff\\|", "speed-up"],
        [
            [name, f"{dt:.2f}", f"{rate:.1f}", f"{peak:.0f}", f"{diff:.2e}", speed]
            for name, dt, rate, peak, diff, speed in rows
        ],
    )


if __name__ == "__main__":
    main()
