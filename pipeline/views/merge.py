"""Validate every shard and merge them into ``bag.h5`` (``python -m pipeline.views merge``).

Each shard must be present, match its recorded content digest, be complete, with its row count
and index range matching the manifest and the same settings as the others. ``bag.h5`` holds real datasets (``copy``) or an HDF5 virtual
dataset (``vds``): a missing source of a VDS would read as fill values, hence the validation here
and in ``BagDataset``. ``copy`` streams the rows shard by shard in ``ROW_CHUNK`` blocks: memory does
not grow with the bag. ``bag.h5`` gets a recorded digest; ``verify_view_file`` checks it (and, for
a VDS, the shards it maps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from pipeline.config import result_neutral_keys
from pipeline.data.readers import list_imagenet
from pipeline.io import atomic_path
from pipeline.records import write_record
from pipeline.views.hdf5 import (
    ROW_KEYS,
    ViewsError,
    copy_rows,
    create_row_datasets,
    run_command,
    verify_view_file,
    vlen_u8,
)
from pipeline.views.store import resolve_views_settings, shard_range

LOG = logging.getLogger("cdgmae.views")

# attributes every shard of a bag shares (same fingerprint), copied onto the bag
COMMON_ATTRS = (
    "generator",
    "settings",
    "is_baseline",
    "n_views",
    "jpeg_quality",
    "image_size",
    "fingerprint",
    "format_version",
)


def validate_shard(path: Path, k: int, shards: int, expected: tuple[int, int] | None = None) -> dict:
    """Verify a shard's digest, check it is complete and self-consistent; return its attributes.

    A digest mismatch raises ``IntegrityError`` naming the shard."""
    if not path.exists():
        raise ViewsError(f"missing shard {k} of {shards}: {path}")
    verify_view_file(path)
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
            lens = {key: len(f[key]) for key in ROW_KEYS}
            index = f["index"][:]
    except (OSError, KeyError) as err:
        raise ViewsError(f"shard {path} cannot be read: {err}") from err
    if not a.get("complete", False):
        raise ViewsError(f"shard {path} is incomplete (attribute complete is not set)")
    rows = int(a["expected_rows"])
    if any(n != rows for n in lens.values()):
        raise ViewsError(f"shard {path}: dataset lengths {lens} != expected_rows {rows}")
    if int(a["shard"]) != k or int(a["shards"]) != shards:
        raise ViewsError(f"shard {path} is shard {a['shard']} of {a['shards']}, expected {k} of {shards}")
    lo, hi = int(a["index_start"]), int(a["index_end"])
    if expected is not None and (lo, hi) != tuple(expected):
        raise ViewsError(
            f"shard {path} covers global indices [{lo}, {hi}) but the manifest gives [{expected[0]}, {expected[1]})"
        )
    if rows + int(a["n_rejects"]) != hi - lo:
        raise ViewsError(
            f"shard {path}: {rows} rows + {a['n_rejects']} rejects != {hi - lo} source images in its range"
        )
    if rows and (np.any(np.diff(index) <= 0) or index[0] < lo or index[-1] >= hi):
        raise ViewsError(f"shard {path}: global indices not increasing within [{lo}, {hi})")
    return a


def _validate_all(shard_paths: list[Path], n_images: int | None, part_size: int | None) -> list[dict]:
    """Every shard valid, one settings fingerprint, and together they tile the manifest."""
    S = len(shard_paths)
    if n_images is not None and part_size is None:
        raise ValueError("merge_shards: part_size is needed to check shard ranges against n_images")
    attrs = []
    for k, p in enumerate(shard_paths):
        exp = shard_range(n_images, k, S, part_size) if n_images is not None else None
        attrs.append(validate_shard(p, k, S, exp))
    fps = {a["fingerprint"] for a in attrs}
    if len(fps) != 1:
        raise ViewsError(f"shards were generated with different settings: {sorted(fps)}")
    for a, b in zip(attrs, attrs[1:]):
        if int(a["index_end"]) != int(b["index_start"]):
            raise ViewsError(
                "shards do not tile the manifest: gap/overlap between "
                f"[{a['index_start']}, {a['index_end']}) and "
                f"[{b['index_start']}, {b['index_end']})"
            )
    return attrs


def _write_vds(f, shard_paths: list[Path], rows: list[int], M: int, out: Path) -> None:
    """Row datasets of ``f`` as virtual datasets over the shards."""
    N = sum(rows)
    # source paths relative to the bag: resolved against the VDS file's own folder
    for key, shape_tail, dtype in (
        ("real", (), vlen_u8()),
        ("views", (M,), vlen_u8()),
        ("image_id", (), h5py.string_dtype()),
        ("index", (), np.int64),
        ("seed", (M,), np.int64),
    ):
        layout = h5py.VirtualLayout(shape=(N,) + shape_tail, dtype=dtype)
        r0 = 0
        for p, n in zip(shard_paths, rows):
            if n:
                src = h5py.VirtualSource(os.path.relpath(p, out.parent), key, shape=(n,) + shape_tail, dtype=dtype)
                layout[r0 : r0 + n] = src
            r0 += n
        f.create_virtual_dataset(key, layout)


def _copy_shards(f, shard_paths: list[Path], n_rows: int, M: int) -> None:
    """Row datasets of ``f`` streamed from the shards (bounded memory)."""
    create_row_datasets(f, n_rows, M)
    at = 0
    for p in shard_paths:
        with h5py.File(p, "r") as src:
            at += copy_rows(src, 0, len(src["index"]), f, at)


def merge_shards(
    shard_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    n_images: int | None = None,
    part_size: int | None = None,
    mode: str = "copy",
) -> Path:
    """Validate all shards and write the merged bag (copy into real datasets, or a VDS)."""
    shard_paths = [Path(p) for p in shard_paths]
    attrs = _validate_all(shard_paths, n_images, part_size)
    S = len(shard_paths)
    rows = [int(a["expected_rows"]) for a in attrs]
    N, M = sum(rows), int(attrs[0]["n_views"])
    out = Path(out)
    with atomic_path(out, digest=True) as tmp:
        with h5py.File(tmp, "w") as f:
            if mode == "copy":
                _copy_shards(f, shard_paths, N, M)
            elif mode == "vds":
                _write_vds(f, shard_paths, rows, M, out)
            else:
                raise ValueError(f"unknown merge mode {mode!r} (copy, vds)")
            f.attrs.update({k: attrs[0][k] for k in COMMON_ATTRS})
            samplers = [s for a in attrs for s in json.loads(a.get("samplers", "[]"))]
            f.attrs["samplers"] = json.dumps([s for i, s in enumerate(samplers) if s not in samplers[:i]])
            f.attrs.update(
                expected_rows=N,
                n_shards=S,
                shard_rows=rows,
                merge_mode=mode,
                n_rejects=sum(int(a["n_rejects"]) for a in attrs),
                n_images_total=int(attrs[0]["n_images_total"]),
            )
            f.attrs["complete"] = True
    LOG.info("merged %d shards, %d bags (%s) -> %s", S, N, mode, out)
    return out


def merge(args: argparse.Namespace) -> Path:
    """The bag from the parsed ``merge`` arguments."""
    cfg = resolve_views_settings(args.settings)
    n_images = None
    if args.root:
        n = len(list_imagenet(args.root))
        n_images = n if cfg["max_images"] is None else min(n, cfg["max_images"])
    if len(args.shards) != cfg["shards"]:
        raise ViewsError(f"{len(args.shards)} shard files given, views.shards = {cfg['shards']}")
    out = merge_shards(
        args.shards, args.out, n_images=n_images, part_size=int(cfg["part_size"]), mode=args.mode or cfg["merge_mode"]
    )
    with h5py.File(out, "r") as f:
        views = json.loads(f.attrs["settings"])
    # the generator's model folder (an S-LDM) joins the inputs, so its record's environment does too
    model = (views.get("generator_settings") or {}).get("model_path")
    inputs = [*args.shards, model if model and Path(model).is_dir() else None]
    drop = {*result_neutral_keys("views"), "generator", "generators", "figure_images"}
    merge_settings = {k: v for k, v in cfg.items() if k not in drop}
    write_record(
        out, kind="bag", command=("views", "merge"), inputs=inputs, settings={"merge": merge_settings, "views": views}
    )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.views merge", description="Validate all shards and write bag.h5."
    )
    ap.add_argument("--shards", nargs="+", required=True, help="shard files in shard order")
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", help="source root: check each shard's range against the manifest")
    ap.add_argument("--settings", help="views section (JSON or file)")
    ap.add_argument("--mode", choices=["copy", "vds"], help="default: views.merge_mode")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    run_command(lambda: merge(args), args.threads)
