"""The paper's Figure 4 (from ``results/figure4.csv``) and the training-loss curves.

    python -m pipeline.report figure4 --table results/figure4.csv --output results/figure4.png
    python -m pipeline.report loss-curves --logs results/pretrain/**/train_log.csv \\
        --output results/figures/loss_curves.png
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.cells import parse_model_path  # noqa: E402
from pipeline.cli import command_parser
from pipeline.io import atomic_path  # noqa: E402
from pipeline.report.table import HEADLINE, REFERENCE_ROW  # noqa: E402
from pipeline.runtime import setup_logging  # noqa: E402

FIGURE4_TITLES = ["DAVIS J&F_m", "VIP mIoU", "JHMDB PCK@0.1"]  # one panel per HEADLINE metric


def plot_figure4(table: pd.DataFrame, output: str | Path) -> None:
    """Bars per method and arch for the headline metrics, random-init references as lines."""
    trained = table[table["method"] != REFERENCE_ROW]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (metric, title) in zip(axes, zip(HEADLINE, FIGURE4_TITLES)):
        methods = list(dict.fromkeys(trained["method"]))
        archs = list(dict.fromkeys(trained["arch"]))
        width = 0.8 / max(len(archs), 1)
        for j, arch in enumerate(archs):
            vals = [trained[(trained.method == m) & (trained.arch == arch)][metric].mean() for m in methods]
            errs = [trained[(trained.method == m) & (trained.arch == arch)][f"{metric}_std"].mean() for m in methods]
            ax.bar(np.arange(len(methods)) + j * width, vals, width, yerr=np.nan_to_num(errs), label=arch)
        for arch, ls in zip(archs, ["--", ":"]):
            ref = table[(table["method"] == REFERENCE_ROW) & (table["arch"] == arch)][metric]
            if len(ref):
                ax.axhline(float(ref.iloc[0]), color="k", ls=ls, lw=1, label=f"random init {arch}")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
        ax.set_xticklabels([m.replace(" on ", "\non ") for m in methods], fontsize=6)
        ax.set_title(title)
    axes[0].legend(fontsize=6)
    fig.suptitle("Figure 4: patch size 16 vs 8", fontsize=9)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_loss_curves(logs: list[str], output: str | Path) -> None:
    """One training-loss curve per ``results/pretrain/<model>/train_log.csv``."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for log in logs:
        df = pd.read_csv(log)
        m = re.search(r"results/pretrain/(.+)/train_log\.csv$", Path(log).as_posix())
        info = parse_model_path(m.group(1)) if m else {}
        label = f"N={info.get('anchors')} ra={info.get('anchor_mask')} seed={info.get('seed')}"
        ax.plot(df["step"], df["loss"], lw=0.8, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("normalized-pixel MSE (masked patches)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def figure4_main(argv=None) -> None:
    """``figure4``: Figure 4 from the table ``table --name figure4`` wrote."""
    ap = command_parser("report", "figure4", __doc__)
    ap.add_argument("--table", required=True, help="results/figure4.csv")
    ap.add_argument("--output", required=True, help="PNG")
    args = ap.parse_args(argv)
    setup_logging()
    plot_figure4(pd.read_csv(args.table), args.output)


def loss_curves_main(argv=None) -> None:
    """``loss-curves``: the training-loss curves of the given train logs."""
    ap = command_parser("report", "loss-curves", __doc__)
    ap.add_argument("--logs", nargs="+", required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    setup_logging()
    plot_loss_curves(args.logs, args.output)
