"""The propagation stage's leaf types: the settings of one dataset's run (``PropagationSettings``)
and one video to propagate (``Video``). A module of their own so that ``run``, ``drivers`` and
``figures`` share them without importing one another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import labels
from pipeline.config import section_defaults


@dataclass
class PropagationSettings:
    """The propagation settings of one dataset (config ``propagation`` + its dataset section)."""

    dataset: str
    size: list[int]
    topk: int
    temperature: float = 0.7
    radius: float = 20
    queue: int = 20
    feature_batch: int = 5
    query_chunk: int = 4096
    label_downsample: str = "bilinear"
    gt_mode: str | None = None  # DAVIS only
    sigma: float = 0.5  # JHMDB only
    readout_topk: int = 5  # JHMDB only

    @classmethod
    def from_settings(cls, dataset: str, settings: dict) -> PropagationSettings:
        if dataset not in labels.EVAL_DATASETS:
            raise ValueError(f"dataset must be one of {labels.EVAL_DATASETS}, got {dataset!r}")
        section = section_defaults("propagation", overrides=settings)
        ds = section[dataset]
        return cls(
            dataset=dataset,
            size=list(ds["size"]),
            topk=ds["topk"],
            temperature=section["temperature"],
            radius=section["radius"],
            queue=section["queue"],
            feature_batch=section["feature_batch"],
            query_chunk=section["query_chunk"],
            label_downsample=section["label_downsample"],
            gt_mode=ds.get("gt_mode"),
            sigma=ds.get("sigma", 0.5),
            readout_topk=ds.get("readout_topk", 5),
        )


@dataclass
class Video:
    """One video to propagate: name, frames, and the dataset-specific label/readout plumbing."""

    name: str
    frames: list[Path]
    first_labels: Callable  # (rgb0, input_hw, grid) -> (gh, gw, L)
    on_frame: Callable  # (t, (gh, gw, L) soft map) -> None; writes the prediction of frame t
    finish: Callable  # () -> None; writes per-video files once every frame is done
    overlay: Callable  # (t, resized image) -> (image, keypoints or None) for the figure
    state: dict  # per-video scratch shared by the callbacks; "keep" = frames kept for figures
