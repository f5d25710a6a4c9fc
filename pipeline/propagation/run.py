"""Stage 4: training-free label propagation (DAVIS-2017 / VIP / JHMDB), reference protocol: the run.

One run = one encoder checkpoint on one dataset: read and encode each video's frames, propagate
frame 0's labels (``pipeline.propagation.algorithm``, where the protocol and its quirks are named),
write the predictions in the dataset's result layout (``pipeline.propagation.drivers``), a few
qualitative figures (``pipeline.propagation.figures``), score them (``pipeline.propagation.score``)
and write ``metrics.csv``::

    python -m pipeline.propagation run --checkpoint CKPT --dataset davis --root ROOT --output-dir OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline import constants, labels
from pipeline.config import load_settings, section_defaults
from pipeline.data.readers import read_rgb, read_vallist
from pipeline.devices import resolve_device, set_threads
from pipeline.io import write_csv_atomic, write_text_atomic
from pipeline.pretrain.checkpoints import load_encoder, verify_checkpoint
from pipeline.propagation.algorithm import grid_size, input_size, propagate
from pipeline.propagation.drivers import WRITERS, score_predictions
from pipeline.propagation.figures import figure_frames, save_figure
from pipeline.propagation.settings import PropagationSettings, Video
from pipeline.provenance import code_digest
from pipeline.records import write_record
from pipeline.runtime import LOG, progress, setup_logging

IMAGENET_MEAN = np.asarray(constants.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.asarray(constants.IMAGENET_STD, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# frames and features


def load_frame(rgb: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 RGB -> (3, H', W') float32 normalized input and the resized [0, 1] RGB image.

    Order as the reference: /255 in float32, then OpenCV bilinear resize (skipped at the same
    size), then ImageNet mean/std.
    """
    img = rgb.astype(np.float32) / 255.0
    if img.shape[:2] != tuple(hw):
        img = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    return ((img - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), img


def encode_frames(encoder, frames: Iterable[np.ndarray], batch_size: int, device):
    """Normalized (3, H, W) frames -> (T, hw, C) L2-normalized final-norm patch tokens on device.

    Each real frame is encoded once (the reference also encodes its ``queue`` padded copies).
    """
    out, batch = [], []

    def flush():
        x = torch.from_numpy(np.stack(batch)).to(device)
        feats = encoder.dense_features(x)  # (B, C, gh, gw)
        feats = F.normalize(feats, dim=1).flatten(2).transpose(1, 2)  # (B, hw, C) row-major
        out.append(feats.float())
        batch.clear()

    with torch.inference_mode():
        for frame in frames:
            batch.append(frame)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# one video


@dataclass
class VideoResult:
    """What a dataset writer needs from one propagated video."""

    input_hw: tuple[int, int]
    grid: tuple[int, int]
    orig_hw: tuple[int, int]
    images: dict[int, np.ndarray]  # kept resized [0, 1] RGB frames (figures), by frame index


def propagate_video(
    encoder,
    frame_paths: Sequence[Path],
    read_frame: Callable,
    protocol: PropagationSettings,
    first_labels: Callable,
    on_frame: Callable,
    device,
    keep_images: Sequence[int] = (),
) -> VideoResult:
    """Encode the frames, build frame 0's grid labels, propagate, hand each frame to ``on_frame``.

    first_labels(rgb0_uint8, input_hw, grid) -> (gh, gw, L) array; on_frame(t, (gh, gw, L) numpy).
    """
    first = read_frame(frame_paths[0])
    orig_hw = first.shape[:2]
    hw = input_size(orig_hw, protocol.size)
    grid = grid_size(hw, encoder.patch_size)
    images: dict[int, np.ndarray] = {}

    def frames():
        for t, path in enumerate(frame_paths):
            rgb = first if t == 0 else read_frame(path)
            if rgb.shape[:2] != orig_hw:
                raise ValueError(f"{path}: frame size {rgb.shape[:2]} differs from the video's first frame {orig_hw}")
            x, resized = load_frame(rgb, hw)
            if t in keep_images:
                images[t] = resized
            yield x

    with torch.inference_mode():
        feats = encode_frames(encoder, frames(), protocol.feature_batch, device)
        labels0 = torch.from_numpy(first_labels(first, hw, grid)).reshape(grid[0] * grid[1], -1)
        propagate(
            feats,
            labels0,
            grid,
            topk=protocol.topk,
            temperature=protocol.temperature,
            radius=protocol.radius,
            queue=protocol.queue,
            query_chunk=protocol.query_chunk,
            on_frame=lambda t, p: on_frame(t, p.reshape(*grid, -1).cpu().numpy()),
            show_progress=True,
        )
    return VideoResult(hw, grid, orig_hw, images)


# ---------------------------------------------------------------------------------------------
# stage entry point


def _safe_name(name: str) -> str:
    return name.replace("/", "__")


def model_name_from_checkpoint(checkpoint: str | Path) -> str:
    """``results/pretrain/<model>/checkpoint.pth`` -> ``<model>``; else the parent folder name."""
    parts = Path(checkpoint).parts
    if "pretrain" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("pretrain")
        if i < len(parts) - 2:
            return "/".join(parts[i + 1 : -1])
    return Path(checkpoint).parent.name


def code_sha256() -> str:
    """One digest of the code this stage's predictions depend on (``pipeline.provenance``)."""
    return code_digest("pipeline.propagation.run")


def _claim_predictions(pred_dir: Path, run_key: str) -> None:
    """Keep ``pred_dir`` only if an earlier run with the same key wrote it; then record the key."""
    key_file = pred_dir / ".run_key.json"
    if pred_dir.exists() and (not key_file.exists() or key_file.read_text() != run_key):
        LOG.info("removing predictions of a different run: %s", pred_dir)
        shutil.rmtree(pred_dir)
    write_text_atomic(key_file, run_key)


def _propagate_videos(
    encoder, videos: list[Video], protocol: PropagationSettings, output_dir: Path, *, n_figures: int, model: str, device
) -> None:
    """Propagate every video not yet marked done under ``predictions/.done``; figures of the first
    ``n_figures``, titled with ``model``."""
    dataset = protocol.dataset
    done_dir = output_dir / "predictions" / ".done"
    for i, video in enumerate(progress(videos, desc=f"{dataset} videos", unit="video")):
        marker = done_dir / _safe_name(video.name)
        if marker.exists():
            continue
        keep = figure_frames(len(video.frames)) if i < n_figures else []
        video.state["keep"] = set(keep)
        result = propagate_video(
            encoder, video.frames, read_rgb, protocol, video.first_labels, video.on_frame, device, keep_images=keep
        )
        video.finish()
        if keep:
            save_figure(
                video,
                result.images,
                output_dir / "figures" / f"{_safe_name(video.name)}.png",
                f"{model} - {dataset} {video.name}",
            )
        write_text_atomic(
            marker, json.dumps({"frames": len(video.frames), "input_hw": result.input_hw, "grid": result.grid})
        )


def _metrics_row(
    dataset: str, model: str, metrics: dict, protocol: PropagationSettings, patch_size: int, videos, checkpoint
):
    """The ``metrics.csv`` row: headline metrics, then the protocol and the run's size."""
    return {
        "dataset": dataset,
        "model": model,
        **metrics,
        "size": "x".join(str(s) for s in protocol.size),
        "topk": protocol.topk,
        "temperature": protocol.temperature,
        "radius": protocol.radius,
        "queue": protocol.queue,
        "gt_mode": protocol.gt_mode or "",
        "patch_size": patch_size,
        "label_downsample": protocol.label_downsample,
        "videos": len(videos),
        "frames": sum(len(v.frames) for v in videos),
        "checkpoint": str(checkpoint),
    }


def run_propagation(
    checkpoint: str | Path,
    dataset: str,
    root: str | Path,
    output_dir: str | Path,
    settings: dict | None = None,
    model: str | None = None,
    device: str | None = None,
):
    """Propagate every video of ``dataset`` under ``root``, write predictions, score them, and write
    ``metrics.csv``. Returns the metrics row as a dict.

    Resumable: a video whose predictions are complete (marker under ``predictions/.done``) is
    skipped when the run key (checkpoint hash, protocol, root, code) is unchanged; otherwise the
    stale predictions are removed first, so the scorer never sees another run's files.
    """
    settings = settings or {}
    protocol = PropagationSettings.from_settings(dataset, settings)
    section = section_defaults("propagation", overrides=settings)
    vallist = section[dataset].get("vallist")
    names = [e.name for e in read_vallist(dataset, vallist)] if vallist else None
    output_dir, root = Path(output_dir), Path(root)
    pred_dir = output_dir / "predictions"
    device = resolve_device(device)
    model = model or model_name_from_checkpoint(checkpoint)
    run_key = {
        # verified before anything is claimed: a corrupt checkpoint raises IntegrityError naming it
        # the workflow's own (init-random, import-external, pretraining): its digest is required
        "checkpoint_sha256": verify_checkpoint(checkpoint, external=False),
        "protocol": protocol.__dict__,
        "root": str(root.resolve()),
        "vallist": names,
        "code_sha256": code_sha256(),
    }
    _claim_predictions(pred_dir, json.dumps(run_key, sort_keys=True))

    encoder = load_encoder(checkpoint, device=device, external=False)
    videos = WRITERS[dataset](root, pred_dir, protocol, names)
    LOG.info(
        "%s: %d videos, protocol %s, patch %d, device %s", dataset, len(videos), protocol, encoder.patch_size, device
    )
    _propagate_videos(encoder, videos, protocol, output_dir, n_figures=section["figures"], model=model, device=device)
    metrics = score_predictions(
        dataset, root, pred_dir, output_dir / "scores", protocol, names=[v.name for v in videos]
    )
    row = _metrics_row(dataset, model, metrics, protocol, encoder.patch_size, videos, checkpoint)
    write_csv_atomic(pd.DataFrame([row]), output_dir / "metrics.csv")
    write_record(
        output_dir / "metrics.csv",
        kind="metrics",
        command=("propagation", "run"),
        inputs=[checkpoint],
        settings={"dataset": dataset, "protocol": protocol.__dict__, "vallist": names},
        device=device,
        precision="fp32",
    )
    LOG.info("metrics: %s", {k: row[k] for k in metrics})
    return row


# ---------------------------------------------------------------------------------------------
# CLI


def _run_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.propagation run",
        description="Label propagation of one encoder on one dataset (reference protocol), then "
        "scoring. Checkpoints of a random-init or an external encoder are made by "
        "'python -m pipeline.pretrain init-random / import-external'.",
    )
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint (payload or MAE format)")
    ap.add_argument("--dataset", required=True, choices=labels.EVAL_DATASETS)
    ap.add_argument("--root", required=True, help="dataset root in the official layout")
    ap.add_argument("--output-dir", required=True, help="results/eval/<model>/<dataset>")
    ap.add_argument("--settings", help="config 'propagation' section (JSON or file); partial is fine")
    ap.add_argument(
        "--dataset-settings", help="config 'propagation.<dataset>' section (JSON); overrides the one in --settings"
    )
    ap.add_argument("--model", help="model name for metrics.csv (default: from the checkpoint path)")
    ap.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.propagation run ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    args = _run_parser().parse_args(argv)
    set_threads(args.threads)
    settings = load_settings(args.settings)
    if args.dataset_settings:
        settings[args.dataset] = load_settings(args.dataset_settings)
    run_propagation(
        args.checkpoint, args.dataset, args.root, args.output_dir, settings, model=args.model, device=args.device
    )
