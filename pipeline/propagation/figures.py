"""Qualitative propagation figures (paper Figures 6-8: frame 0 with its labels, then a few propagated frames)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colormaps  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402
from pipeline.propagation.settings import Video  # noqa: E402

# JHMDB skeleton: parent joint of each joint (reference ``vis_pose``)
JHMDB_PARENT = (1, 1, 0, 0, 1, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10)


def class_colors(n: int) -> np.ndarray:
    """(max(n, 1), 3) uint8 colors of the tab20 colormap, cycled."""
    cmap = colormaps["tab20"]
    return (np.array([cmap(i % 20)[:3] for i in range(max(n, 1))]) * 255).astype(np.uint8)


def blend(img: np.ndarray, ids: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """[0, 1] RGB image with non-zero ids painted half-transparent in their color."""
    out = img.copy()
    fg = ids > 0
    out[fg] = 0.5 * img[fg] + 0.5 * colors[ids[fg].astype(np.int64) % len(colors)] / 255.0
    return out


def figure_frames(n_frames: int, panels: int = 4) -> list[int]:
    """Frame 0 plus ``panels - 1`` propagated frames spread over the video (last one included)."""
    if n_frames <= 1:
        return [0]
    picks = np.linspace(0, n_frames - 1, min(panels, n_frames)).round().astype(int)
    return sorted(set(picks.tolist()))


def save_figure(video: Video, images: dict[int, np.ndarray], path: Path, title: str) -> None:
    """One row of panels: each kept frame with ``video.overlay``'s labels (masks or a skeleton)."""
    frames = sorted(images)
    fig, axes = plt.subplots(1, len(frames), figsize=(3.2 * len(frames), 2.6), squeeze=False)
    colors = plt.get_cmap("tab20")
    for ax, t in zip(axes[0], frames):
        img, pts = video.overlay(t, images[t])
        ax.imshow(np.clip(img, 0, 1))
        if pts is not None:
            for j, parent in enumerate(JHMDB_PARENT):
                ax.plot([pts[0, j], pts[0, parent]], [pts[1, j], pts[1, parent]], "-", color=colors(j % 20), lw=2)
            ax.scatter(pts[0], pts[1], s=10, c="white", edgecolors="black", linewidths=0.5)
        ax.set_title("frame 0 (labels)" if t == 0 else f"frame {t}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
