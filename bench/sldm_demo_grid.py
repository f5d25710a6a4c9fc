"""What a bag's views look like, in numbers: static vs smooth, and whether they carry their source's colour.

    python -m bench.sldm_demo_grid --bag sldm=results/views/sldm/bag.h5 \
        --bag warp=results/views/warp/bag.h5 --bag crop=results/views/crop/bag.h5 [--size 32]

Per bag (every row, every view; real images and views area-resized to ``--size`` px first, by
default the demo S-LDM's 32 px, so views upsampled from the model's resolution are not smoother than
the real images only for being upsampled):

- roughness: mean absolute difference of horizontally and vertically neighbouring pixels (0-255
  levels, all channels) of the real images and of the views, and their ratio. Static is rough:
  i.i.d. uniform noise scores 255 / 3 = 85.
- colour: ``mean_lab_distance`` (CIE76 Delta E of mean CIELAB colours, the Tables 1 / 9 colour
  column) of each view to its own source and, averaged, to every other source of the bag; and the
  share of views whose nearest source by mean colour is their own (chance: 1 / rows). The
  conditioning transfers colour if own < others and the share is well above chance. Delta E mixes
  hue with saturation, so the mean chroma C* of real images and views and the mean hue-angle
  difference of each view's mean colour to its source's (unrelated hues: 90 degrees) say which of
  the two a view gets wrong.

The machine's load average is printed with the table: the figures do not depend on it, but the run
time of the demo that made the bags does.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from pipeline.consistency.pair_metrics import mean_lab_colours
from pipeline.imaging import resize_square
from pipeline.views.bag import BagDataset

NOISE_ROUGHNESS = 255 / 3  # E|X - Y| of two independent uniform levels on [0, 255]


def neighbour_roughness(images: np.ndarray) -> float:
    """Mean absolute difference of horizontally and vertically neighbouring pixels of (N, H, W, 3)
    uint8 images, in 0-255 levels (both directions weighted by their pixel pairs)."""
    x = images.astype(np.int16)
    horizontal = np.abs(np.diff(x, axis=2))
    vertical = np.abs(np.diff(x, axis=1))
    return float((horizontal.sum() + vertical.sum()) / (horizontal.size + vertical.size))


def read_bag(path: str, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(real (N, S, S, 3), views (N, M, S, S, 3), generator) of every row, resized to ``size``."""
    bag = BagDataset(path)
    real, views = [], []
    for i in range(len(bag)):
        item = bag[i]
        real.append(resize_square(item["real"], size))
        views.append([resize_square(v, size) for v in item["views"]])
    return np.stack(real), np.asarray(views), bag.generator


def grid_figures(real: np.ndarray, views: np.ndarray) -> dict:
    """The roughness and colour figures of one bag (see the module docstring)."""
    n, m = views.shape[:2]
    if n < 2:
        raise ValueError("colour to other sources needs a bag of at least 2 rows")
    source_lab = mean_lab_colours(real)  # (N, 3)
    view_lab = mean_lab_colours(views.reshape(n * m, *views.shape[2:])).reshape(n, m, 3)
    distance = np.linalg.norm(view_lab[:, :, None, :] - source_lab[None, None, :, :], axis=-1)  # (N, M, N)
    own = distance[np.arange(n), :, np.arange(n)]  # (N, M): each view to its own source
    others = (distance.sum(axis=2) - own) / (n - 1)  # (N, M): mean over the other sources
    hue = np.arctan2(view_lab[..., 2], view_lab[..., 1]) - np.arctan2(source_lab[:, 2], source_lab[:, 1])[:, None]
    hue_difference = np.abs((hue + np.pi) % (2 * np.pi) - np.pi)  # (N, M) radians in [0, pi]
    real_rough, view_rough = neighbour_roughness(real), neighbour_roughness(views.reshape(n * m, *views.shape[2:]))
    return {
        "rows": n,
        "views": m,
        "roughness_real": real_rough,
        "roughness_views": view_rough,
        "roughness_ratio": view_rough / real_rough if real_rough else float("nan"),  # flat sources: no ratio
        "delta_e_own": float(own.mean()),
        "delta_e_others": float(others.mean()),
        "own_nearest": float((distance.argmin(axis=2) == np.arange(n)[:, None]).mean()),
        "chance": 1 / n,
        "chroma_real": float(np.hypot(source_lab[:, 1], source_lab[:, 2]).mean()),
        "chroma_views": float(np.hypot(view_lab[..., 1], view_lab[..., 2]).mean()),
        "hue_difference_own": float(np.degrees(hue_difference).mean()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bag", action="append", required=True, metavar="NAME=PATH", help="a merged bag of views")
    p.add_argument("--size", type=int, default=32, help="resize real images and views to this many px first")
    args = p.parse_args(argv)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    print(f"images and views area-resized to {args.size} px; roughness of i.i.d. uniform noise: {NOISE_ROUGHNESS:.1f}")
    print()
    print(
        "| bag | generator | rows x views | roughness real | roughness views | views / real "
        "| ΔE own source | ΔE other sources | own source nearest | chance | C* real | C* views | hue vs own source |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.bag:
        name, sep, path = spec.partition("=")
        if not sep:
            p.error(f"--bag expects NAME=PATH, got {spec!r}")
        real, views, generator = read_bag(path, args.size)
        f = grid_figures(real, views)
        print(
            f"| {name} | {generator} | {f['rows']} x {f['views']} | {f['roughness_real']:.1f} | "
            f"{f['roughness_views']:.1f} | {f['roughness_ratio']:.2f} | {f['delta_e_own']:.1f} | "
            f"{f['delta_e_others']:.1f} | {100 * f['own_nearest']:.0f} % | {100 * f['chance']:.1f} % | "
            f"{f['chroma_real']:.1f} | {f['chroma_views']:.1f} | {f['hue_difference_own']:.0f}° |"
        )


if __name__ == "__main__":
    main()
