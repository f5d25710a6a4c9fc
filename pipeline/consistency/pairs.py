"""Pair kinds of Tables 1 and 9: seeded sampling, scoring, and the table / per-pair rows.

Pair kinds (Table 1): ``video_frames`` (two frames of one video, gap drawn from
``consistency.frame_gap``), ``generated`` (real image -> one generated view of the configured
generator's bag), ``knn_images`` (pretraining image -> one of its k nearest neighbours by global
embedding, never itself, read from ``results/consistency/knn.npz``), ``random_images`` (two distinct
pretraining images). Table 9 = ``generated`` for every generator in ``consistency.generators``
(same seed, so the same bag positions and views for every generator) plus the video reference.
A generator's row is labelled, and carries the sampler, encoder source and model digest, from what
its bag recorded (``pipeline.labels.generator_row_label`` / ``GENERATOR_COLUMNS``).
Every pair is scored by the feature metrics (GS / LS / NPS) and by the colour distance
``mean_lab_distance`` of its two images (``pipeline.consistency.pair_metrics``).
Features are extracted once per distinct image of a pair kind; descriptor encoders are mean-centred
over the images of that pair kind (so a generator's row is identical in Tables 1 and 9). Every draw
is recorded in the per-pair CSV.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.consistency.pair_metrics import COLOUR_METRIC, METRICS, centre_descriptors, pair_metrics
from pipeline.consistency.sources import BagSource, ImageListSource, VideoFrameSource, extract_features_and_colours
from pipeline.labels import GENERATOR_COLUMNS, generator_columns, generator_row_label
from pipeline.seeding import derive_seed

LOG = logging.getLogger("cdgmae.consistency")

KIND_LABELS = {
    "video_frames": "Video frames",
    "knn_images": "K-nn images",
    "random_images": "Random images",
}  # the paper's row names (paper_numbers.yaml)
NPS_DIRECTION = {
    "video_frames": "earlier frame -> later frame",
    "generated": "real -> generated view",
    "knn_images": "query image -> neighbour",
    "random_images": "first image -> second image",
}
SCORES = (*METRICS, COLOUR_METRIC)  # the per-pair scores, in the column order of ``score_kind``
PAIR_COLUMNS = [
    "pair_kind",
    "views",
    "generator",
    "pair",
    "a_id",
    "b_id",
    "a_index",
    "b_index",
    "a_frame",
    "b_frame",
    "gap",
    "view",
    "neighbour_rank",
    *SCORES,
    "encoder",
    "seed",
]
TABLE_COLUMNS = [
    "pair_kind",
    "views",
    "generator",
    *SCORES,
    *(f"{m}_std" for m in SCORES),
    "n_pairs",
    "encoder",
    "is_baseline",
    "nps_direction",
    *GENERATOR_COLUMNS,  # the sampler, encoder source and model digest of a generator's row
    "seed",
    "run_label",
]


def generated_label(generator: str, samplers=()) -> str:
    """Row label of real<->generated pairs (``pipeline.labels.generator_row_label``): an S-LDM says
    whether it was trained here (and its encoder's source) or imported; weights-free pseudo-views
    are named as baselines. ``samplers``: the bag's recorded generator descriptions."""
    return generator_row_label(generator, samplers)


# --------------------------------------------------------------------------------------------
# sampling (seeded, one stream per kind)


def pair_rng(seed: int, kind: str) -> np.random.Generator:
    """Per-kind stream: adding or resizing one kind never changes another kind's pairs."""
    return np.random.default_rng(derive_seed(seed, "consistency", kind))


def _distinct(rng: np.random.Generator, population: int, n: int, what: str) -> np.ndarray:
    if n > population:
        LOG.warning("%s: only %d items for %d requested pairs; using %d", what, population, n, population)
    return np.sort(rng.choice(population, size=min(n, population), replace=False))


def sample_generated_pairs(n_images: int, n_views: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(bag position, view) for ``n`` distinct bag images; the same for every generator."""
    if n_images < 1 or n_views < 1:
        raise ValueError(f"bag holds {n_images} images x {n_views} views: nothing to pair")
    rng = pair_rng(seed, "generated")
    positions = _distinct(rng, n_images, n, "generated")
    views = rng.integers(0, n_views, size=len(positions))
    return [(int(p), int(v)) for p, v in zip(positions, views)]


def sample_video_pairs(
    lengths: Sequence[int], gap_range: Sequence[float], n: int, seed: int
) -> list[tuple[int, int, int]]:
    """(video, first frame, gap) triples: video uniform, gap uniform in the integer range
    [gap_lo, gap_hi] clipped to the video length, first frame uniform among valid starts."""
    lo, hi = int(math.ceil(gap_range[0])), int(math.floor(gap_range[1]))
    if lo < 1 or hi < lo:
        raise ValueError(f"consistency.frame_gap {list(gap_range)}: need 1 <= low <= high")
    usable = [v for v, length in enumerate(lengths) if length >= 2]
    if not usable:
        raise ValueError("no video with at least 2 frames for video frame pairs")
    if len(usable) < len(lengths):
        LOG.warning("video pairs: skipping %d videos with fewer than 2 frames", len(lengths) - len(usable))
    rng = pair_rng(seed, "video_frames")
    pairs = []
    for v in rng.choice(usable, size=n, replace=True):
        length = lengths[v]
        gap = min(int(rng.integers(lo, hi + 1)), length - 1)
        start = int(rng.integers(0, length - gap))
        pairs.append((int(v), start, gap))
    return pairs


def sample_knn_pairs(neighbours: np.ndarray, k: int, n: int, seed: int) -> list[tuple[int, int, int]]:
    """(query, neighbour, rank 1..k): distinct queries, rank uniform among the k nearest. Images
    the neighbour search skipped as unreadable (rows of -1) are never queries."""
    if k > neighbours.shape[1]:
        raise ValueError(
            f"consistency.knn_k = {k} exceeds the {neighbours.shape[1]} neighbours in knn.npz (pretrain.knn_k)"
        )
    rng = pair_rng(seed, "knn_images")
    readable = np.flatnonzero(neighbours[:, 0] >= 0)  # all rows when nothing was skipped: same draws
    queries = readable[_distinct(rng, len(readable), n, "knn_images")]
    ranks = rng.integers(0, k, size=len(queries))
    pairs = [(int(q), int(neighbours[q, r]), int(r) + 1) for q, r in zip(queries, ranks)]
    for q, nb, _ in pairs:
        if q == nb:
            raise ValueError(f"knn.npz pairs image {q} with itself")
    return pairs


def sample_random_pairs(n_images: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(i, j) with i != j, both uniform over the pretraining images."""
    if n_images < 2:
        raise ValueError(f"random pairs need at least 2 images, got {n_images}")
    rng = pair_rng(seed, "random_images")
    first = rng.integers(0, n_images, size=n)
    second = rng.integers(0, n_images - 1, size=n)
    second = second + (second >= first)  # uniform over every index except ``first``
    return [(int(i), int(j)) for i, j in zip(first, second)]


# --------------------------------------------------------------------------------------------
# pair kinds


@dataclass
class PairKind:
    """One row of Table 1/9: pairs of keys into one source, with what to record per pair."""

    kind: str
    views: str
    source: Any
    keys_a: list
    keys_b: list
    records: list[dict] = field(default_factory=list)  # per-pair columns (ids, frames, view, ...)
    generator: str = ""
    is_baseline: bool = False
    columns: dict = field(default_factory=dict)  # GENERATOR_COLUMNS of a generator's row


def generated_kind(bag: BagSource, generator: str, n: int, seed: int) -> PairKind:
    if bag.generator != generator:
        raise ValueError(f"{bag.path} holds {bag.generator!r} views, not {generator!r}")
    pairs = sample_generated_pairs(len(bag), bag.n_views, n, seed)
    records = []
    for pos, view in pairs:
        image_id = bag.image_id(pos)
        records.append({"a_id": image_id, "b_id": image_id, "a_index": pos, "b_index": pos, "view": view})
    return PairKind(
        "generated",
        generated_label(generator, bag.samplers),
        bag,
        [(p, -1) for p, _ in pairs],
        [(p, v) for p, v in pairs],
        records,
        generator,
        bag.is_baseline,
        generator_columns(bag.samplers),
    )


def video_kind(videos, gap_range, n: int, seed: int) -> PairKind:
    pairs = sample_video_pairs([len(v.frames) for v in videos], gap_range, n, seed)
    records = [
        {"a_id": videos[v].name, "b_id": videos[v].name, "a_frame": t, "b_frame": t + g, "gap": g} for v, t, g in pairs
    ]
    return PairKind(
        "video_frames",
        KIND_LABELS["video_frames"],
        VideoFrameSource(videos),
        [(v, t) for v, t, _ in pairs],
        [(v, t + g) for v, t, g in pairs],
        records,
    )


def knn_kind(images: ImageListSource, neighbours: np.ndarray, k: int, n: int, seed: int) -> PairKind:
    pairs = sample_knn_pairs(neighbours, k, n, seed)
    records = [
        {"a_id": images.image_id(q), "b_id": images.image_id(nb), "a_index": q, "b_index": nb, "neighbour_rank": r}
        for q, nb, r in pairs
    ]
    return PairKind(
        "knn_images", KIND_LABELS["knn_images"], images, [q for q, _, _ in pairs], [nb for _, nb, _ in pairs], records
    )


def random_kind(images: ImageListSource, n: int, seed: int) -> PairKind:
    pairs = sample_random_pairs(len(images), n, seed)
    records = [{"a_id": images.image_id(i), "b_id": images.image_id(j), "a_index": i, "b_index": j} for i, j in pairs]
    return PairKind(
        "random_images", KIND_LABELS["random_images"], images, [i for i, _ in pairs], [j for _, j in pairs], records
    )


# --------------------------------------------------------------------------------------------
# scoring


def score_kind(encoder, pk: PairKind, batch_size: int, num_workers: int = 0):
    """(P, 4) numpy scores of one pair kind (columns ``SCORES``); features and colours extracted
    once per distinct key."""
    unique = list(dict.fromkeys(pk.keys_a + pk.keys_b))
    where = {key: i for i, key in enumerate(unique)}
    glob, patches, colours = extract_features_and_colours(
        encoder, pk.source, unique, batch_size, num_workers, desc=f"{pk.kind} features"
    )
    if encoder.centre:
        glob, patches = centre_descriptors(glob, patches)
    ia = [where[k] for k in pk.keys_a]
    ib = [where[k] for k in pk.keys_b]
    dev = encoder.device
    scores = pair_metrics(glob[ia].to(dev), glob[ib].to(dev), patches[ia].to(dev), patches[ib].to(dev))
    colour_distance = np.linalg.norm(colours[ia] - colours[ib], axis=1)  # mean_lab_distance
    scores = np.column_stack([scores.cpu().numpy(), colour_distance])
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores).all(1))[0])
        raise FloatingPointError(f"{pk.kind}: non-finite score for pair {pk.records[bad]}")
    return scores


def _table_row(pk: PairKind, scores: np.ndarray, encoder_name: str, seed: int, run_label: str) -> dict:
    """One table row: mean and std (ddof 1; NaN for a single pair) of each metric over the pairs."""
    row = {"pair_kind": pk.kind, "views": pk.views, "generator": pk.generator}
    row.update({m: float(scores[:, c].mean()) for c, m in enumerate(SCORES)})
    row.update(
        {f"{m}_std": float(scores[:, c].std(ddof=1)) if len(scores) > 1 else math.nan for c, m in enumerate(SCORES)}
    )
    row.update(
        n_pairs=len(scores),
        encoder=encoder_name,
        is_baseline=pk.is_baseline,
        nps_direction=NPS_DIRECTION[pk.kind],
        **pk.columns,
        seed=seed,
        run_label=run_label,
    )
    return row


def score_table(encoder, kinds: Sequence[PairKind], batch_size: int, num_workers: int, seed: int, run_label: str):
    """(table, per-pair) DataFrames; one table row per pair kind (mean and std over its pairs)."""
    rows, pair_rows = [], []
    for pk in kinds:
        scores = score_kind(encoder, pk, batch_size, num_workers)
        for i, (rec, s) in enumerate(zip(pk.records, scores)):
            pair_rows.append(
                {
                    "pair_kind": pk.kind,
                    "views": pk.views,
                    "generator": pk.generator,
                    "pair": i,
                    **rec,
                    **dict(zip(SCORES, map(float, s))),
                    "encoder": encoder.name,
                    "seed": seed,
                }
            )
        rows.append(_table_row(pk, scores, encoder.name, seed, run_label))
        LOG.info("%-40s GS %.3f  LS %.3f  NPS %.3f  colour dE %.2f  (%d pairs)", pk.views, *scores.mean(0), len(scores))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    pairs = pd.DataFrame(pair_rows, columns=PAIR_COLUMNS)
    for c in ("a_index", "b_index", "a_frame", "b_frame", "gap", "view", "neighbour_rank"):
        pairs[c] = pairs[c].astype("Int64")  # blanks where a column does not apply to a kind
    return table, pairs
