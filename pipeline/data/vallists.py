"""Reference-format val lists (spec propagation-eval.md §3): the writer and the ``vallist`` command.

One line per video, two fields separated by one space, no trailing newline::

    davis  <root>/JPEGImages/480p/<seq> <root>/Annotations/480p/<seq>
    vip    <root>/Images/videos<N> <root>/Annotations/Category_ids/videos<N>
    jhmdb  <root>/joint_positions/<class>/<video>/joint_positions.mat <root>/Rename_Images/<class>/<video>

The parser (``read_vallist``, ``ValEntry``) is defined with the readers, whose ``JhmdbDataset``
takes a val list, and re-exported here.

``python -m pipeline.data vallist --kind {davis,vip,jhmdb} --root R --out F [--prefix P]
[--jhmdb-splits R/splits --split 1]``
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.readers import (
    VALLIST_KINDS,
    DatasetError,
    DavisDataset,
    JhmdbDataset,
    ValEntry,
    VipDataset,
    jhmdb_split_videos,
    read_vallist,
)
from pipeline.io import write_text_atomic
from pipeline.runtime import setup_logging

__all__ = ["ValEntry", "read_vallist", "write_vallist", "main"]


def _list_lines(kind: str, names: Sequence[str], prefix: str) -> list[str]:
    def at(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    if kind == "davis":
        return [f"{at('JPEGImages/480p/' + s)} {at('Annotations/480p/' + s)}" for s in names]
    if kind == "vip":
        return [f"{at('Images/' + v)} {at('Annotations/Category_ids/' + v)}" for v in names]
    # JHMDB: label first (CropMAE's order; videowalk put the frames first)
    return [f"{at('joint_positions/' + v + '/joint_positions.mat')} {at('Rename_Images/' + v)}" for v in names]


def write_vallist(
    kind: str,
    root: str | os.PathLike,
    path: str | os.PathLike,
    names: Sequence[str] | None = None,
    prefix: str | None = None,
) -> list[str]:
    """Write the reference val list of ``root`` to ``path`` (one space, two fields, no trailing
    newline) and return its lines.

    ``names`` defaults to the dataset's own order (DAVIS: val.txt order). ``prefix`` is the root
    as written in the lines (default: ``root`` as given); ``"."`` writes paths relative to the
    root, which ``read_vallist`` resolves against the list's folder, so a list stored inside its
    root keeps working when the tree is moved.
    """
    if kind not in VALLIST_KINDS:
        raise ValueError(f"val list kind must be one of {VALLIST_KINDS}, got {kind!r}")
    root = Path(root)
    if names is None:
        ds = {"davis": DavisDataset, "vip": VipDataset, "jhmdb": JhmdbDataset}[kind](root)
        names = ds.sequences if kind == "davis" else ds.videos
    prefix = str(root) if prefix is None else prefix
    prefix = "" if prefix in ("", ".", "./") else (prefix.rstrip("/") or "/")
    lines = _list_lines(kind, list(names), prefix)
    write_text_atomic(path, "\n".join(lines))
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.data vallist", description="Write a val list in the reference format."
    )
    ap.add_argument("--kind", required=True, choices=VALLIST_KINDS)
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix", default=None, help="root as written in the lines (default: --root as given)")
    ap.add_argument("--jhmdb-splits", default=None, help="JHMDB splits/ folder: list the videos of one official split")
    ap.add_argument("--split", type=int, default=1, help="JHMDB split number (reference: 1)")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        names = (
            jhmdb_split_videos(args.jhmdb_splits, args.split) if args.kind == "jhmdb" and args.jhmdb_splits else None
        )
        lines = write_vallist(args.kind, args.root, args.out, names=names, prefix=args.prefix)
    except DatasetError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {len(lines)} lines to {args.out}")
