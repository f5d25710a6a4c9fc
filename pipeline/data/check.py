"""Check a dataset root against its official layout: the ``check`` command.

``python -m pipeline.data check --kind {imagenet,videos,davis,vip,jhmdb} --root R [--list F] [--deep]``
opens ``R`` with the reader of its kind and prints counts; a malformed root exits with the
reader's ``DatasetError`` (the path and the expected layout).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from pipeline.data.readers import (
    KINDS,
    VIP_CLASSES,
    DatasetError,
    DavisDataset,
    JhmdbDataset,
    VipDataset,
    list_imagenet,
    list_videos,
    read_vallist,
)
from pipeline.registry import Registry
from pipeline.runtime import setup_logging

# kind -> counts(root, names, deep); names: the videos of a val list, or None for the default
CHECKS = Registry("--kind")


@CHECKS.register("imagenet")
def _check_imagenet(root, names: Sequence[str] | None, deep: bool) -> dict:
    recs = list_imagenet(root)
    return {"images": len(recs), "classes": len({r.label for r in recs})}


@CHECKS.register("videos")
def _check_videos(root, names: Sequence[str] | None, deep: bool) -> dict:
    vids = list_videos(root)
    return {"videos": len(vids), "frames": sum(len(v.frames) for v in vids)}


@CHECKS.register("davis")
def _check_davis(root, names: Sequence[str] | None, deep: bool) -> dict:
    ds = DavisDataset(root, sequences=names)
    return {
        "sequences": len(ds),
        "frames": sum(len(ds.frames(s)) for s in ds.sequences),
        "annotations": sum(len(ds.annotations(s)) for s in ds.sequences),
        "objects": sum(ds.num_objects(s) for s in ds.sequences),
    }


@CHECKS.register("vip")
def _check_vip(root, names: Sequence[str] | None, deep: bool) -> dict:
    ds = VipDataset(root, videos=names)
    out = {
        "videos": len(ds),
        "frames": sum(len(ds.frames(v)) for v in ds.videos),
        "annotations": sum(len(ds.annotations(v)) for v in ds.videos),
    }
    if deep:
        ids = set()
        for v in ds.videos:
            for p in ds.annotations(v):
                ids.update(np.unique(ds.read_annotation(p)).tolist())
        bad = sorted(i for i in ids if i >= len(VIP_CLASSES) and i != 255)
        if bad:
            raise DatasetError(f"VIP annotations under {root} hold ids {bad} outside 0-19")
        out["classes_present"] = len(ids - {255})
    return out


@CHECKS.register("jhmdb")
def _check_jhmdb(root, names: Sequence[str] | None, deep: bool) -> dict:
    ds = JhmdbDataset(root, split_list=names)
    out = {"videos": len(ds), "frames": sum(len(ds.frames(v)) for v in ds.videos)}
    if deep:
        for v in ds.videos:
            pos = ds.read_joints(v)
            if pos.shape[2] < len(ds.frames(v)):
                raise DatasetError(
                    f"pos_img has {pos.shape[2]} frames but the video has {len(ds.frames(v))}: {ds.joints_path(v)}"
                )
    return out


def check_root(
    kind: str, root: str | os.PathLike, vallist: str | os.PathLike | None = None, deep: bool = False
) -> dict:
    """Open ``root`` with the reader of ``kind`` and return counts; ``deep`` reads every label."""
    names = [e.name for e in read_vallist(kind, vallist)] if vallist else None
    if kind not in CHECKS:
        raise ValueError(f"unknown dataset kind {kind!r}; one of {KINDS}")
    return CHECKS[kind](root, names, deep)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.data check", description="Validate a dataset root and print counts."
    )
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--root", required=True)
    ap.add_argument("--list", default=None, help="optional val list (reference format)")
    ap.add_argument("--deep", action="store_true", help="also read every annotation/joint file")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        counts = check_root(args.kind, args.root, args.list, deep=args.deep)
    except DatasetError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{args.kind} root {args.root}: OK")
    for k, v in counts.items():
        print(f"  {k}: {v}")
