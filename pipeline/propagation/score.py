"""Standalone scorers for label-propagation results: DAVIS-2017 J&F, VIP mIoU, JHMDB PCK.

Usable on any method's results folder::

    python -m pipeline.propagation score davis --davis-root ROOT --results DIR --output-dir OUT [--gt-size 480 880]
    python -m pipeline.propagation score vip   --vip-root ROOT   --results DIR --output-dir OUT
    python -m pipeline.propagation score jhmdb --jhmdb-root ROOT --results DIR --output-dir OUT

Ground truth is read through :mod:`pipeline.data.readers`; the metric definitions live in
:mod:`pipeline.propagation.metrics`. Every run computes from scratch and replaces the CSVs in ``OUT``
atomically (the official DAVIS toolkit silently reuses an existing CSV; we never do). A malformed
results folder (missing frame, wrong size, id above the object count, bad ``pos_img``) raises
:class:`ScoreError` naming the file.

Python API (same code path as the CLI): :func:`davis_scores`, :func:`vip_scores`,
:func:`jhmdb_scores`; each returns a dict of DataFrames / numbers and writes CSVs when given an
``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.readers import (
    JHMDB_JOINTS,
    VIP_CLASSES,
    DatasetError,
    DavisDataset,
    JhmdbDataset,
    VipDataset,
    read_id_png,
    read_pos_img,
)
from pipeline.imaging import pil_nearest
from pipeline.io import write_csv_atomic, write_text_atomic
from pipeline.propagation import metrics
from pipeline.runtime import progress, setup_logging

LOG = logging.getLogger("cdgmae.score")

DAVIS_VOID = 255
# CSV float format of the official DAVIS toolkit (CropMAE re-reads these rounded values).
DAVIS_CSV_FLOAT = "%.3f"
DEFAULT_DAVIS_GT_SIZE = (480, 880)


class ScoreError(ValueError):
    """A results folder does not match the ground truth; the message names the file."""


def _read_ids(path: Path) -> np.ndarray:
    """HxW uint8 ids of a prediction PNG (indexed or grey), or ScoreError naming the file."""
    if not path.is_file():
        raise ScoreError(f"missing prediction: {path}")
    try:
        return read_id_png(path)
    except DatasetError as err:
        raise ScoreError(f"bad prediction PNG: {err}") from err


def _write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def _fresh(path: Path) -> None:
    if path.exists():
        LOG.info("recomputing %s (an existing file is never reused)", path)


# ----------------------------------------------------------------------------------------------
# DAVIS-2017


def davis_sequence_scores(
    gt_paths: Sequence[Path], pred_dir: Path, read_gt, n_objects: int, bound_th: float = metrics.BOUNDARY_TH
) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame J and F ``(n_objects, len(gt_paths))`` of one sequence.

    ``read_gt(path)`` returns the GT id map as scored (void zeroed, resized if asked); the
    prediction of GT frame ``<stem>.png`` is ``pred_dir/<stem>.png`` at the same size.
    """
    j = np.zeros((n_objects, len(gt_paths)))
    f = np.zeros((n_objects, len(gt_paths)))
    pred_paths = [pred_dir / f"{p.stem}.png" for p in gt_paths]
    missing = [p for p in pred_paths if not p.is_file()]
    if missing:
        raise ScoreError(
            f"missing prediction: {missing[0]} ({len(missing)} of {len(pred_paths)} "
            f"frames of {pred_dir.name} missing; one PNG per GT frame is expected)"
        )
    for i, (gt_path, pred_path) in enumerate(zip(gt_paths, pred_paths)):
        gt = read_gt(gt_path)
        pred = _read_ids(pred_path)
        if pred.shape != gt.shape:
            raise ScoreError(
                f"prediction size {pred.shape[1]}x{pred.shape[0]} (WxH) differs from the "
                f"ground truth {gt.shape[1]}x{gt.shape[0]}: {pred_path}"
            )
        top = int(pred.max())
        if top > n_objects:
            raise ScoreError(
                f"predicted id {top} above the {n_objects} object(s) of the first-frame ground truth: {pred_path}"
            )
        j[:, i], f[:, i] = metrics.davis_frame_scores(gt, pred, n_objects, bound_th)
    return j, f


def davis_scores(
    davis_root: str | os.PathLike,
    results_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    gt_mode: str = "native",
    size: Sequence[int] | None = None,
    sequences: Iterable[str] | None = None,
    split: str = "val",
    bound_th: float = metrics.BOUNDARY_TH,
    uint8_bins: bool = True,
) -> dict:
    """Score DAVIS-2017 semi-supervised results with the official toolkit's definitions.

    Objects = ids 1..max id of the frame-0 GT (255 zeroed); the first and last frames are not
    scored; each object weighs the same in the global means. ``gt_mode="resized"`` scores against
    GT PIL-nearest-resized to ``size`` (H, W) = 480x880 by default, as the reference evaluation
    did (its DAVIS_480_880 copy); ``"native"`` uses the GT as stored.

    Returns ``{"global": 1-row DataFrame (toolkit columns), "per_sequence": DataFrame (Sequence,
    J-Mean, F-Mean per <seq>_<object>), "per_object": DataFrame with all statistics, "info":
    dict}`` at full precision; ``output_dir`` gets ``global_results-<split>.csv`` and
    ``per-sequence_results-<split>.csv`` (3 decimals, toolkit format) and ``scoring.json``.
    """
    gt_size = _davis_gt_size(gt_mode, size)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ScoreError(f"results folder not found: {results_dir}")
    ds = DavisDataset(davis_root, split=split, sequences=list(sequences) if sequences else None)

    def read_gt(path: Path) -> np.ndarray:
        ids = ds.read_annotation(path)
        ids = np.where(ids == DAVIS_VOID, 0, ids)
        return ids if gt_size is None else pil_nearest(ids, gt_size)

    per_object, tolerances, n_frames = davis_object_statistics(ds, results_dir, read_gt, bound_th, uint8_bins)
    if per_object.empty:
        raise ScoreError(f"no object in the first-frame ground truth of any sequence under {davis_root}")
    glob = metrics.davis_global(
        per_object[["J-Mean", "J-Recall", "J-Decay"]].to_numpy(),
        per_object[["F-Mean", "F-Recall", "F-Decay"]].to_numpy(),
    )
    global_df = pd.DataFrame([glob], columns=list(metrics.DAVIS_GLOBAL_COLUMNS))
    per_sequence = per_object[["Sequence", "J-Mean", "F-Mean"]].copy()
    info = {
        "dataset": "davis",
        "davis_root": str(davis_root),
        "results": str(results_dir),
        "split": split,
        "gt_mode": gt_mode,
        "gt_size": list(gt_size) if gt_size else None,
        "bound_th": bound_th,
        "boundary_tolerance_px": tolerances,
        "uint8_decay_bins": uint8_bins,
        "sequences": len(ds.sequences),
        "objects": len(per_object),
        "frames_scored": n_frames,
        "global": glob,
    }
    _log_davis(info)
    if output_dir is not None:
        _write_davis(Path(output_dir), split, global_df, per_sequence, info)
    return {"global": global_df, "per_sequence": per_sequence, "per_object": per_object, "info": info}


def _log_davis(info: dict) -> None:
    glob, gt_size = info["global"], info["gt_size"]
    LOG.info(
        "DAVIS (%s GT%s): J&F %.4f, J %.4f, F %.4f over %d objects, %d frames",
        info["gt_mode"],
        f" {gt_size[0]}x{gt_size[1]}" if gt_size else "",
        glob["J&F-Mean"],
        glob["J-Mean"],
        glob["F-Mean"],
        info["objects"],
        info["frames_scored"],
    )


def _write_davis(out: Path, split: str, global_df: pd.DataFrame, per_sequence: pd.DataFrame, info: dict) -> None:
    """The toolkit's two CSVs (3 decimals) and ``scoring.json``."""
    for name, table in (
        (f"global_results-{split}.csv", global_df),
        (f"per-sequence_results-{split}.csv", per_sequence),
    ):
        _fresh(out / name)
        write_csv_atomic(table, out / name, float_format=DAVIS_CSV_FLOAT)
    _write_json(out / "scoring.json", info)


def _davis_gt_size(gt_mode: str, size: Sequence[int] | None) -> tuple[int, int] | None:
    """The (H, W) the GT is resized to, or None to score against the GT as stored."""
    if gt_mode not in ("native", "resized"):
        raise ValueError(f"gt_mode must be 'native' or 'resized', got {gt_mode!r}")
    if gt_mode == "native":
        return None
    gt_size = tuple(int(v) for v in (size if size is not None else DEFAULT_DAVIS_GT_SIZE))
    if len(gt_size) != 2:
        raise ValueError(f"gt_mode='resized' needs size = (H, W), got {size!r}")
    return gt_size


def davis_object_statistics(
    ds: DavisDataset, results_dir: Path, read_gt, bound_th: float, uint8_bins: bool
) -> tuple[pd.DataFrame, dict[str, int], int]:
    """Per-object J/F mean, recall and decay over every sequence of ``ds``: (DataFrame with one row
    per ``<seq>_<object>``, boundary tolerance in pixels per sequence, frames scored)."""
    rows, tolerances, n_frames = [], {}, 0
    for seq in progress(ds.sequences, desc="DAVIS sequences", unit="seq"):
        annotations = ds.annotations(seq)
        if len(annotations) != len(ds.frames(seq)):
            raise ScoreError(
                f"{len(ds.frames(seq))} frames but {len(annotations)} annotations in "
                f"{ds.label_dir / seq}: every DAVIS frame must be annotated"
            )
        if len(annotations) < 3:
            raise ScoreError(
                f"sequence {seq} has {len(annotations)} frame(s); the first and last "
                f"are not scored, so at least 3 are needed: {ds.label_dir / seq}"
            )
        first = read_gt(annotations[0])
        n_objects = int(first.max())
        tolerances[seq] = metrics.boundary_tolerance(first.shape, bound_th)
        j, f = davis_sequence_scores(annotations[1:-1], results_dir / seq, read_gt, n_objects, bound_th)
        n_frames += len(annotations) - 2
        for k in range(n_objects):
            jm, jr, jd = metrics.db_statistics(j[k], uint8_bins)
            fm, fr, fd = metrics.db_statistics(f[k], uint8_bins)
            rows.append(
                {
                    "Sequence": f"{seq}_{k + 1}",
                    "J-Mean": jm,
                    "J-Recall": jr,
                    "J-Decay": jd,
                    "F-Mean": fm,
                    "F-Recall": fr,
                    "F-Decay": fd,
                }
            )
    return pd.DataFrame(rows), tolerances, n_frames


# ----------------------------------------------------------------------------------------------
# VIP


def vip_scores(
    vip_root: str | os.PathLike,
    results_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    videos: Iterable[str] | None = None,
    n_classes: int = metrics.VIP_NUM_CLASSES,
) -> dict:
    """VIP mIoU from one confusion matrix over every annotated frame of every video (frame 0 too).

    ``results_dir/videos<N>/<stem>.png`` holds single-channel class ids for each GT annotation
    ``Annotations/Category_ids/videos<N>/<stem>.png``; a prediction at another size is
    PIL-nearest-resized to the GT (as the reference). GT values outside 0..n-1 are ignored.

    Returns ``{"miou": float (fraction), "per_class": DataFrame (class_id, class, iou),
    "confusion": (n, n) int64, "info": dict}``; ``output_dir`` gets ``miou.csv`` (one row:
    ``mIoU`` then one ``IoU-<class>`` column per class), ``confusion_matrix.csv`` and
    ``scoring.json``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ScoreError(f"results folder not found: {results_dir}")
    ds = VipDataset(vip_root, videos=list(videos) if videos else None)
    hist, n_frames, n_resized = vip_confusion(ds, results_dir, n_classes)
    if n_resized:
        LOG.info("VIP: %d of %d predictions were nearest-resized to the GT size", n_resized, n_frames)
    iou = metrics.iou_from_confusion(hist)
    miou = metrics.mean_iou(hist)
    names = _vip_class_names(n_classes)
    per_class = pd.DataFrame({"class_id": np.arange(n_classes), "class": names, "iou": iou})
    info = {
        "dataset": "vip",
        "vip_root": str(vip_root),
        "results": str(results_dir),
        "videos": len(ds.videos),
        "frames_scored": n_frames,
        "resized_predictions": n_resized,
        "classes_scored": int(np.count_nonzero(~np.isnan(iou))),
        "mIoU": miou,
    }
    LOG.info("VIP: mIoU %.4f over %d frames of %d videos", miou, n_frames, len(ds.videos))
    if output_dir is not None:
        out = Path(output_dir)
        row = {"mIoU": miou, **{f"IoU-{n}": v for n, v in zip(names, iou)}}
        _fresh(out / "miou.csv")
        write_csv_atomic(pd.DataFrame([row]), out / "miou.csv")
        write_csv_atomic(
            pd.DataFrame(hist, index=names, columns=names),
            out / "confusion_matrix.csv",
            index=True,
            index_label="gt\\pred",
        )
        _write_json(out / "scoring.json", info)
    return {"miou": miou, "per_class": per_class, "confusion": hist, "info": info}


def vip_confusion(ds: VipDataset, results_dir: Path, n_classes: int) -> tuple[np.ndarray, int, int]:
    """(n, n) int64 confusion matrix (GT rows) over every annotated frame, frames scored, and how
    many predictions were nearest-resized to their GT."""
    hist = np.zeros((n_classes, n_classes), np.int64)
    n_frames, n_resized = 0, 0
    for video in progress(ds.videos, desc="VIP videos", unit="video"):
        for gt_path in ds.annotations(video):
            pred_path = results_dir / video / f"{gt_path.stem}.png"
            gt = ds.read_annotation(gt_path)
            pred = _read_ids(pred_path)
            if pred.shape != gt.shape:
                pred = pil_nearest(pred, gt.shape)
                n_resized += 1
            if int(pred.max()) >= n_classes:
                raise ScoreError(f"predicted class {int(pred.max())} outside 0..{n_classes - 1}: {pred_path}")
            hist += metrics.confusion_matrix(gt, pred, n_classes)
            n_frames += 1
    return hist, n_frames, n_resized


def _vip_class_names(n_classes: int) -> list[str]:
    return [VIP_CLASSES[i] if i < len(VIP_CLASSES) else f"class{i}" for i in range(n_classes)]


# ----------------------------------------------------------------------------------------------
# JHMDB


def jhmdb_result_videos(results_dir: Path) -> list[str]:
    """``"<class>/<video>"`` names of every ``<class>/<video>/joint_positions.mat`` in a results folder."""
    return sorted(f"{p.parent.parent.name}/{p.parent.name}" for p in results_dir.glob("*/*/joint_positions.mat"))


def jhmdb_scores(
    jhmdb_root: str | os.PathLike,
    results_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    thresholds: Sequence[float] = metrics.PCK_THRESHOLDS,
) -> dict:
    """JHMDB PCK (%) of the videos present in ``results_dir``.

    ``results_dir/<class>/<video>/joint_positions.mat`` holds ``pos_img`` (2, 15, T) in 1-based
    pixels of the original frames, like the GT; a joint with negative x or a NaN coordinate was not
    placed and is dropped from the normalizing box and the distances (reference visibility rule).
    Normalizer: 0.6 x diagonal of the visible GT joints' box per frame; frame 0 excluded; distances
    pooled per joint over all videos; PCK = mean over the 15 joints.

    Returns ``{"pck": DataFrame (alpha, PCK, one column per joint), "info": dict}``;
    ``output_dir`` gets ``pck.csv`` (same table) and ``scoring.json``.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ScoreError(f"results folder not found: {results_dir}")
    videos = jhmdb_result_videos(results_dir)
    if not videos:
        raise ScoreError(f"no <class>/<video>/joint_positions.mat under {results_dir}")
    ds = JhmdbDataset(jhmdb_root, split_list=videos)
    pooled, n_frames = jhmdb_pooled_distances(ds, videos, results_dir)
    per_joint = metrics.pck_per_joint(pooled, thresholds)
    mean = metrics.pck_mean(per_joint)
    never = [JHMDB_JOINTS[j] for j in range(len(JHMDB_JOINTS)) if np.isnan(per_joint[0, j])]
    if never:
        LOG.warning("JHMDB: joints never placed in any scored frame (left out of the mean): %s", never)
    table = pd.DataFrame(per_joint, columns=list(JHMDB_JOINTS))
    table.insert(0, "PCK", mean)
    table.insert(0, "alpha", list(thresholds))
    info = {
        "dataset": "jhmdb",
        "jhmdb_root": str(jhmdb_root),
        "results": str(results_dir),
        "videos": len(videos),
        "frames": n_frames,
        "joints_never_scored": never,
        "pck": {f"{a:g}": float(v) for a, v in zip(thresholds, mean)},
    }
    LOG.info("JHMDB: %s over %d videos", ", ".join(f"PCK@{a:g} {v:.2f}" for a, v in zip(thresholds, mean)), len(videos))
    if output_dir is not None:
        out = Path(output_dir)
        _fresh(out / "pck.csv")
        write_csv_atomic(table, out / "pck.csv")
        _write_json(out / "scoring.json", info)
    return {"pck": table, "info": info}


def jhmdb_pooled_distances(ds: JhmdbDataset, videos: Sequence[str], results_dir: Path) -> tuple[list[np.ndarray], int]:
    """Scored normalized distances of each joint pooled over ``videos``, and the frame count."""
    pooled: list[list[np.ndarray]] = [[] for _ in JHMDB_JOINTS]
    n_frames = 0
    for video in progress(videos, desc="JHMDB videos", unit="video"):
        pred_path = results_dir / video / "joint_positions.mat"
        gt = ds.read_joints(video)
        try:
            pred = read_pos_img(pred_path)
        except DatasetError as err:
            raise ScoreError(f"bad prediction: {err}") from err
        if pred.shape != gt.shape:
            raise ScoreError(
                f"pos_img shape {pred.shape} differs from the ground truth {gt.shape} "
                f"({ds.joints_path(video)}): {pred_path}"
            )
        dist, scored = metrics.pck_distances(gt, pred)
        for j in range(len(JHMDB_JOINTS)):
            pooled[j].append(dist[j][scored[j]])
        n_frames += gt.shape[2]
    return [np.concatenate(d) for d in pooled], n_frames


# ----------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.propagation score",
        description="Score label-propagation results (DAVIS J&F, VIP mIoU, JHMDB PCK).",
    )
    sub = ap.add_subparsers(dest="dataset", required=True)

    def common(p):
        p.add_argument("--results", required=True, type=Path, help="results folder to score")
        p.add_argument("--output-dir", required=True, type=Path, help="where the CSVs are written")
        p.add_argument("--log", type=Path, default=None, help="also log to this file")

    d = sub.add_parser("davis", help="DAVIS-2017 semi-supervised J&F (official toolkit definitions)")
    d.add_argument("--davis-root", required=True, type=Path)
    common(d)
    d.add_argument(
        "--gt-mode",
        choices=("native", "resized"),
        default=None,
        help="score against native GT, or GT nearest-resized to --gt-size as the reference "
        "(default: resized when --gt-size is given, else native)",
    )
    d.add_argument(
        "--gt-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help=f"GT size for --gt-mode resized (default {DEFAULT_DAVIS_GT_SIZE[0]} {DEFAULT_DAVIS_GT_SIZE[1]})",
    )
    d.add_argument("--sequences", nargs="+", default=None, help="sequences (default: ImageSets/2017/<split>.txt)")
    d.add_argument("--split", default="val")

    v = sub.add_parser("vip", help="VIP mIoU from one confusion matrix")
    v.add_argument("--vip-root", required=True, type=Path)
    common(v)
    v.add_argument("--videos", nargs="+", default=None, help="videos<N> folders (default: all)")

    j = sub.add_parser("jhmdb", help="JHMDB PCK@0.1..0.5 of the videos in the results folder")
    j.add_argument("--jhmdb-root", required=True, type=Path)
    common(j)
    return ap


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.propagation score {davis,vip,jhmdb} ...``."""
    ap = _parser()
    args = ap.parse_args(argv)
    setup_logging(args.log)
    try:
        _score(ap, args)
    except (ScoreError, DatasetError) as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from err


def _score(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dataset == "davis":
        gt_mode = args.gt_mode or ("resized" if args.gt_size else "native")
        if gt_mode == "native" and args.gt_size:
            ap.error("--gt-size only applies to --gt-mode resized")
        result = davis_scores(
            args.davis_root,
            args.results,
            args.output_dir,
            gt_mode=gt_mode,
            size=args.gt_size,
            sequences=args.sequences,
            split=args.split,
        )
        print(result["global"].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    elif args.dataset == "vip":
        result = vip_scores(args.vip_root, args.results, args.output_dir, videos=args.videos)
        print(f"mIoU {result['miou']:.4f}")
    else:
        result = jhmdb_scores(args.jhmdb_root, args.results, args.output_dir)
        print(result["pck"][["alpha", "PCK"]].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
