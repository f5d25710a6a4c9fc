"""Real images beside their views, the paper's Figure 5 (``python -m pipeline.views figure``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from pipeline.io import atomic_path  # noqa: E402
from pipeline.views.bag import BagDataset  # noqa: E402
from pipeline.views.hdf5 import run_command  # noqa: E402


def plot_bag(bag: str | os.PathLike, out: str | os.PathLike, n_images: int = 4, seed: int = 0):
    """Figure 5 style grid: one row per image, real image then its M views."""
    ds = BagDataset(bag)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(ds), size=min(n_images, len(ds)), replace=False).tolist())
    M = ds.n_views
    fig, axes = plt.subplots(len(picks), M + 1, figsize=(1.8 * (M + 1), 1.8 * len(picks) + 0.6), squeeze=False)
    for r, i in enumerate(picks):
        item = ds[i]
        for c, img in enumerate([item["real"]] + item["views"]):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("real" if c == 0 else f"view {c}", fontsize=9)
        axes[r, 0].set_ylabel(item["image_id"], fontsize=7)
    title = f"Bag of views, generator: {ds.generator}"
    if ds.is_baseline:
        title += "\n(weights-free BASELINE pseudo-views, not CDG-MAE diffusion views)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    ds.close()
    return Path(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.views figure", description="Bag-of-views figure (paper Figure 5)."
    )
    ap.add_argument("--bag", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    run_command(lambda: plot_bag(args.bag, args.out, n_images=args.n_images, seed=args.seed), args.threads)
