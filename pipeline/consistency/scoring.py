"""Stage 2: cross-view consistency scores GS / LS / NPS (paper §3.2, Tables 1 and 9) and the k-NN
neighbour file used by ``target=knn`` pretraining cells.

For two views V1, V2 with global tokens g and patch tokens f_i (i = 1..L, row-major grid order):

    GS  = cos(g(V1), g(V2))
    LS  = 1/L * sum_i cos(f_i(V1), f_i(V2))                 same-position patches
    NPS = 1/L * sum_i max_j cos(f_i(V1), f_j(V2))           direction V1 -> V2 (recorded)

Pair kinds (Table 1): ``video_frames`` (two frames of one video, gap drawn from
``consistency.frame_gap``), ``generated`` (real image -> one generated view of the configured
generator's bag), ``knn_images`` (pretraining image -> one of its k nearest neighbours by global
embedding, never itself, read from ``results/consistency/knn.npz``), ``random_images`` (two distinct
pretraining images). Table 9 = ``generated`` for every generator in ``consistency.generators``
(same seed, so the same bag positions and views for every generator) plus the video reference.
Features are extracted once per distinct image of a pair kind; descriptor encoders are mean-centred
over the images of that pair kind (so a generator's row is identical in Tables 1 and 9).

    python -m pipeline.consistency.scoring neighbours --imagenet-root R --settings JSON --k 5 --output knn.npz
    python -m pipeline.consistency.scoring table1 --bag B --generator G --videos-root V --imagenet-root R \
        --knn knn.npz --settings JSON --seed 0 --output table1.csv --pairs-output pairs.csv
    python -m pipeline.consistency.scoring table9 --bag G=B [--bag G2=B2 ...] --videos-root V ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import load_settings
from pipeline.constants import views_label
from pipeline.devices import set_threads
from pipeline.imaging import load_square, resize_square
from pipeline.io import atomic_path, write_csv_atomic, write_npz_atomic
from pipeline.runtime import derive_seed, progress, setup_logging

LOG = logging.getLogger("cdgmae.consistency")

METRICS = ("global_sim", "local_sim", "nearest_patch_sim")
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


def generated_label(generator: str) -> str:
    """Row label of real<->generated pairs; weights-free pseudo-views are named as baselines."""
    return "Diffusion (S-LDM)" if generator == "sldm" else views_label(generator)


# --------------------------------------------------------------------------------------------
# metrics (batched matrix operations, any device)
# --------------------------------------------------------------------------------------------


def pair_metrics(global_a, global_b, patches_a, patches_b, chunk: int = 64):
    """GS, LS, NPS of P pairs.

    global_*: (P, C); patches_*: (P, L, C) in the same spatial order. Returns (P, 3) float32 on the
    inputs' device. NPS goes a -> b. Pairs are processed ``chunk`` at a time to bound the (P, L, L)
    similarity tensor.
    """
    import torch
    import torch.nn.functional as F

    if patches_a.shape != patches_b.shape:
        raise ValueError(f"patch token shapes differ: {tuple(patches_a.shape)} vs {tuple(patches_b.shape)}")
    gs = F.cosine_similarity(global_a.float(), global_b.float(), dim=-1, eps=1e-8)  # (P,)
    ls, nps = [], []
    for s in range(0, patches_a.shape[0], chunk):
        a = F.normalize(patches_a[s : s + chunk].float(), dim=-1, eps=1e-8)  # (p, L, C)
        b = F.normalize(patches_b[s : s + chunk].float(), dim=-1, eps=1e-8)  # (p, L, C)
        ls.append((a * b).sum(-1).mean(-1))  # (p,) same-position cosines
        sim = torch.bmm(a, b.transpose(1, 2))  # (p, L, L): sim[i, j] = cos(a_i, b_j)
        nps.append(sim.amax(dim=2).mean(-1))  # (p,) best match in b for every patch of a
    empty = gs.new_zeros(0)
    return torch.stack([gs, torch.cat(ls) if ls else empty, torch.cat(nps) if nps else empty], dim=1)


# --------------------------------------------------------------------------------------------
# image sources: key -> HxWx3 uint8
# --------------------------------------------------------------------------------------------


def _load_square(path, size: int) -> np.ndarray:
    """Short side to ``size`` + centre crop: the same preprocessing as the bag's real images."""
    return load_square(path, size)


class ImageListSource:
    """Pretraining images (``list_imagenet`` order = global index); key = global index."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def image_id(self, index: int) -> str:
        return self.records[index].image_id

    def load(self, index: int, size: int) -> np.ndarray:
        return _load_square(self.records[index].path, size)

    def describe(self, index: int) -> str:
        return str(self.records[index].path)


class VideoFrameSource:
    """Frame-folder videos; key = (video position, frame position)."""

    def __init__(self, videos):
        self.videos = videos

    def load(self, key, size: int) -> np.ndarray:
        v, t = key
        return _load_square(self.videos[v].frames[t], size)

    def describe(self, key) -> str:
        v, t = key
        return str(self.videos[v].frames[t])


class BagSource:
    """A merged bag of views; key = (bag position, view) with view -1 = the real image."""

    def __init__(self, path: str | Path):
        import h5py

        from pipeline.views.shards import BagDataset

        self.path = Path(path)
        self.bag = BagDataset(str(self.path))  # checks presence, completeness, VDS sources
        with h5py.File(self.path, "r") as f:  # ids only: no JPEG decoding (views.py layout)
            self.image_ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f["image_id"][:]]
        self.n_views = self.bag.n_views
        self.is_baseline = self.bag.is_baseline
        self.generator = self.bag.generator

    def __len__(self):
        return len(self.bag)

    def image_id(self, position: int) -> str:
        return self.image_ids[position]

    def load(self, key, size: int) -> np.ndarray:
        position, view = key
        item = self.bag[position]
        return resize_square(item["real"] if view < 0 else item["views"][view], size)

    def describe(self, key) -> str:
        position, view = key
        return f"{self.path}[{position}]" + ("(real)" if view < 0 else f"(view {view})")


class _KeyedImages:
    """torch Dataset over source keys -> (S, S, 3) uint8 tensors, decoded in the workers."""

    def __init__(self, source, keys: Sequence, size: int):
        self.source, self.keys, self.size = source, list(keys), size

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        import torch

        key = self.keys[i]
        try:
            image = self.source.load(key, self.size)
        except Exception as err:  # name the file, whatever went wrong while decoding it
            raise RuntimeError(f"cannot read image {self.source.describe(key)}: {err}") from err
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"{self.source.describe(key)}: expected a {self.size}x{self.size}x3 uint8 "
                f"image, got {image.shape} {image.dtype}"
            )
        return torch.from_numpy(np.ascontiguousarray(image))


def iter_feature_batches(
    encoder,
    source,
    keys: Sequence,
    batch_size: int,
    num_workers: int = 0,
    desc: str = "features",
    keep_patches: bool = True,
):
    """Yield (start, TokenFeatures on CPU) for consecutive batches of ``keys``, in order
    (``keep_patches=False``: patch tokens are dropped on the device, only globals come back)."""
    import torch

    loader = torch.utils.data.DataLoader(
        _KeyedImages(source, keys, encoder.image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
    )
    start = 0
    for images in progress(loader, desc=desc, total=len(loader), unit="batch"):
        feats = encoder.encode(images)
        bad = ~torch.isfinite(feats.patch_tokens).all(dim=(1, 2)) | ~torch.isfinite(feats.global_tokens).all(1)
        if bad.any():
            which = [source.describe(keys[start + int(i)]) for i in bad.nonzero().flatten()[:5].tolist()]
            raise FloatingPointError(f"non-finite features for {which}")
        feats.global_tokens = feats.global_tokens.cpu()
        feats.patch_tokens = feats.patch_tokens.cpu() if keep_patches else None
        yield start, feats
        start += len(images)


def extract_features(encoder, source, keys: Sequence, batch_size: int, num_workers: int = 0, desc: str = "features"):
    """Features of every key, once each: (global (N, C), patches (N, L, C)) on CPU, float32."""
    import torch

    glob, patches = [], []
    for _, feats in iter_feature_batches(encoder, source, keys, batch_size, num_workers, desc):
        glob.append(feats.global_tokens)
        patches.append(feats.patch_tokens)
    return torch.cat(glob), torch.cat(patches)


def centre_descriptors(glob, patches):
    """Subtract the mean patch descriptor (over all images and positions) from every token.

    The global token of a descriptor encoder is the mean-pooled patch descriptor, so the centred
    global token is the mean of the centred patches, i.e. ``glob - mean``.
    """
    mean = patches.reshape(-1, patches.shape[-1]).mean(0)  # (C,)
    return glob - mean, patches - mean


# --------------------------------------------------------------------------------------------
# pair sampling (seeded; every draw is recorded in the per-pair CSV)
# --------------------------------------------------------------------------------------------


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
    """(query, neighbour, rank 1..k): distinct queries, rank uniform among the k nearest."""
    if k > neighbours.shape[1]:
        raise ValueError(
            f"consistency.knn_k = {k} exceeds the {neighbours.shape[1]} neighbours in knn.npz (pretrain.knn_k)"
        )
    rng = pair_rng(seed, "knn_images")
    queries = _distinct(rng, len(neighbours), n, "knn_images")
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
# k nearest neighbours over the pretraining set
# --------------------------------------------------------------------------------------------


def nearest_neighbours(embeddings, k: int, device: str = "cpu", chunk: int = 1024):
    """Indices (N, k) int64 and cosine similarities (N, k) of each row's k nearest other rows.

    Cosine similarity of the global embeddings, computed ``chunk`` queries at a time; an image is
    never its own neighbour (its diagonal entry is set to -inf before top-k).
    """
    import torch
    import torch.nn.functional as F

    n = embeddings.shape[0]
    if k >= n:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} images, got {n}")
    bank = F.normalize(embeddings.float().to(device), dim=-1, eps=1e-8)  # (N, C)
    idx_out = torch.empty(n, k, dtype=torch.int64)
    sim_out = torch.empty(n, k, dtype=torch.float32)
    for s in progress(range(0, n, chunk), desc="k-NN", unit="chunk"):
        q = bank[s : s + chunk]  # (c, C)
        sim = q @ bank.T  # (c, N)
        rows = torch.arange(q.shape[0], device=device)
        sim[rows, rows + s] = -math.inf  # never self
        top = sim.topk(k, dim=1)
        idx_out[s : s + chunk] = top.indices.cpu()
        sim_out[s : s + chunk] = top.values.cpu()
    return idx_out, sim_out


def _fingerprint(encoder_settings: dict, image_ids: Sequence[str], part_size: int) -> str:
    h = hashlib.sha256(json.dumps({"encoder": encoder_settings, "part_size": part_size}, sort_keys=True).encode())
    for i in image_ids:
        h.update(i.encode() + b"\n")
    return h.hexdigest()[:16]


def global_embeddings(
    encoder,
    source: ImageListSource,
    batch_size: int,
    num_workers: int,
    state_dir: str | Path | None,
    encoder_settings: dict,
    part_size: int = 8192,
):
    """(N, C) global embeddings of every pretraining image; resumable through ``state_dir``.

    Each part of ``part_size`` images is written atomically as ``part-XXXXXX.npy`` under a folder
    named by a fingerprint of the encoder settings and the image list, and skipped on restart when
    it loads with the expected row count. Descriptor encoders are centred on the whole set.
    """
    import torch

    n = len(source)
    ids = [source.image_id(i) for i in range(n)]
    folder = None
    if state_dir is not None:
        folder = Path(state_dir) / _fingerprint(encoder_settings, ids, part_size)
        folder.mkdir(parents=True, exist_ok=True)
        LOG.info("resumable feature parts in %s", folder)
    parts = []
    n_parts = (n + part_size - 1) // part_size
    for p in range(n_parts):
        keys = list(range(p * part_size, min(n, (p + 1) * part_size)))
        path = folder / f"part-{p:06d}.npy" if folder else None
        if path is not None and path.is_file():
            try:
                arr = np.load(path, allow_pickle=False)
                if arr.shape[0] == len(keys) and np.isfinite(arr).all():
                    parts.append(torch.from_numpy(arr))
                    continue
            except (ValueError, OSError) as err:
                LOG.warning("re-computing unreadable part %s (%s)", path, err)
        glob = torch.cat(
            [
                f.global_tokens
                for _, f in iter_feature_batches(
                    encoder, source, keys, batch_size, num_workers, desc=f"part {p + 1}/{n_parts}", keep_patches=False
                )
            ]
        )
        if path is not None:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, glob.numpy())
        parts.append(glob)
    emb = torch.cat(parts)
    if encoder.centre:
        emb = emb - emb.mean(0)  # = mean-pooled centred descriptors
    return ids, emb


def find_neighbours(
    encoder,
    source: ImageListSource,
    k: int,
    batch_size: int,
    num_workers: int,
    encoder_settings: dict,
    state_dir=None,
    part_size: int = 8192,
) -> dict:
    ids, emb = global_embeddings(encoder, source, batch_size, num_workers, state_dir, encoder_settings, part_size)
    neighbours, sims = nearest_neighbours(emb, k, device=encoder.device)
    return {
        "image_id": np.asarray(ids),
        "neighbours": neighbours.numpy().astype(np.int64),
        "similarity": sims.numpy(),
        "encoder": np.asarray(encoder.name),
    }


def read_knn(path: str | Path, image_ids: Sequence[str]) -> np.ndarray:
    """``neighbours`` of a knn.npz, checked against the current pretraining image list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"k-NN file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        for key in ("image_id", "neighbours"):
            if key not in data:
                raise KeyError(f"{path}: missing array {key!r}")
        stored, neighbours = data["image_id"], data["neighbours"]
    if len(stored) != len(image_ids) or any(a != b for a, b in zip(stored, image_ids)):
        raise ValueError(
            f"{path} was built for another image list ({len(stored)} images, now "
            f"{len(image_ids)}): re-run find_neighbours"
        )
    return neighbours


# --------------------------------------------------------------------------------------------
# scoring pair kinds
# --------------------------------------------------------------------------------------------


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


def score_kind(encoder, pk: PairKind, batch_size: int, num_workers: int = 0):
    """(P, 3) numpy metrics of one pair kind; features extracted once per distinct key."""
    unique = list(dict.fromkeys(pk.keys_a + pk.keys_b))
    where = {key: i for i, key in enumerate(unique)}
    glob, patches = extract_features(encoder, pk.source, unique, batch_size, num_workers, desc=f"{pk.kind} features")
    if encoder.centre:
        glob, patches = centre_descriptors(glob, patches)
    ia = [where[k] for k in pk.keys_a]
    ib = [where[k] for k in pk.keys_b]
    dev = encoder.device
    scores = pair_metrics(glob[ia].to(dev), glob[ib].to(dev), patches[ia].to(dev), patches[ib].to(dev))
    scores = scores.cpu().numpy()
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores).all(1))[0])
        raise FloatingPointError(f"{pk.kind}: non-finite score for pair {pk.records[bad]}")
    return scores


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
        generated_label(generator),
        bag,
        [(p, -1) for p, _ in pairs],
        [(p, v) for p, v in pairs],
        records,
        generator,
        bag.is_baseline,
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
    *METRICS,
    "encoder",
    "seed",
]
TABLE_COLUMNS = [
    "pair_kind",
    "views",
    "generator",
    *METRICS,
    *(f"{m}_std" for m in METRICS),
    "n_pairs",
    "encoder",
    "is_baseline",
    "nps_direction",
    "seed",
    "run_label",
]


def score_table(encoder, kinds: Sequence[PairKind], batch_size: int, num_workers: int, seed: int, run_label: str):
    """(table, per-pair) DataFrames; one table row per pair kind (mean and std over its pairs)."""
    import pandas as pd

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
                    **dict(zip(METRICS, map(float, s))),
                    "encoder": encoder.name,
                    "seed": seed,
                }
            )
        row = {"pair_kind": pk.kind, "views": pk.views, "generator": pk.generator}
        row.update({m: float(scores[:, c].mean()) for c, m in enumerate(METRICS)})
        row.update(
            {
                f"{m}_std": float(scores[:, c].std(ddof=1)) if len(scores) > 1 else math.nan
                for c, m in enumerate(METRICS)
            }
        )
        row.update(
            n_pairs=len(scores),
            encoder=encoder.name,
            is_baseline=pk.is_baseline,
            nps_direction=NPS_DIRECTION[pk.kind],
            seed=seed,
            run_label=run_label,
        )
        rows.append(row)
        LOG.info("%-40s GS %.3f  LS %.3f  NPS %.3f  (%d pairs)", pk.views, *scores.mean(0), len(scores))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    pairs = pd.DataFrame(pair_rows, columns=PAIR_COLUMNS)
    for c in ("a_index", "b_index", "a_frame", "b_frame", "gap", "view", "neighbour_rank"):
        pairs[c] = pairs[c].astype("Int64")  # blanks where a column does not apply to a kind
    return table, pairs


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _resolved(args) -> dict:
    """The consistency section from ``--settings`` (partial) + schema defaults + CLI overrides of
    the output-invariant knobs (Snakemake passes those as resources, so they trigger no rerun)."""
    from pipeline.config import section_defaults

    cfg = section_defaults("consistency", overrides=load_settings(args.settings))
    if args.batch_size is not None:
        cfg["encoder"]["batch_size"] = args.batch_size
    if args.num_workers is not None:
        cfg["num_workers"] = args.num_workers
    return cfg


def _encoder(cfg: dict, device: str | None):
    from pipeline.consistency.encoders import build_encoder

    encoder = build_encoder(cfg["encoder"], device)
    LOG.info("encoder %s on %s", encoder.name, encoder.device)
    return encoder


def _list_videos(root):
    from pipeline.data.readers import list_videos

    return list_videos(root)


def _list_images(root):
    from pipeline.data.readers import list_imagenet

    return ImageListSource(list_imagenet(root))


def _write_tables(table, pairs, output, pairs_output) -> None:
    write_csv_atomic(pairs, pairs_output)
    write_csv_atomic(table, output, float_format="%.6g")
    LOG.info("wrote %s and %s", output, pairs_output)


def cmd_neighbours(args) -> None:
    cfg = _resolved(args)
    encoder = _encoder(cfg, args.device)
    images = _list_images(args.imagenet_root)
    out = find_neighbours(
        encoder,
        images,
        args.k,
        cfg["encoder"]["batch_size"],
        cfg["num_workers"],
        cfg["encoder"],
        args.state_dir,
        args.part_size,
    )
    write_npz_atomic(args.output, out)
    LOG.info("wrote %s: %d images x %d neighbours", args.output, *out["neighbours"].shape)


def cmd_table1(args) -> None:
    cfg = _resolved(args)
    encoder = _encoder(cfg, args.device)
    n, seed = cfg["n_pairs"], args.seed
    images = _list_images(args.imagenet_root)
    neighbours = read_knn(args.knn, [images.image_id(i) for i in range(len(images))])
    kinds = [
        video_kind(_list_videos(args.videos_root), cfg["frame_gap"], n, seed),
        generated_kind(BagSource(args.bag), args.generator, n, seed),
        knn_kind(images, neighbours, cfg["knn_k"], n, seed),
        random_kind(images, n, seed),
    ]
    table, pairs = score_table(encoder, kinds, cfg["encoder"]["batch_size"], cfg["num_workers"], seed, args.run_label)
    _write_tables(table, pairs, args.output, args.pairs_output)


def _bag_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--bag expects GENERATOR=PATH, got {value!r}")
    return name, path


def cmd_table9(args) -> None:
    cfg = _resolved(args)
    encoder = _encoder(cfg, args.device)
    n, seed = cfg["n_pairs"], args.seed
    kinds = []
    if args.videos_root:  # the paper's reference row
        kinds.append(video_kind(_list_videos(args.videos_root), cfg["frame_gap"], n, seed))
    kinds += [generated_kind(BagSource(path), name, n, seed) for name, path in args.bag]
    table, pairs = score_table(encoder, kinds, cfg["encoder"]["batch_size"], cfg["num_workers"], seed, args.run_label)
    _write_tables(table, pairs, args.output, args.pairs_output)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.consistency.scoring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument(
            "--settings", help="consistency config section (JSON string or file); missing keys take the schema defaults"
        )
        p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
        p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads")
        p.add_argument("--batch-size", type=int, default=None, help="override encoder.batch_size")
        p.add_argument("--num-workers", type=int, default=None, help="override num_workers")

    def tables(p):
        p.add_argument("--videos-root", help="frame-folder videos root (video frame pairs)")
        p.add_argument("--seed", type=int, default=0, help="workflow seed (pair sampling)")
        p.add_argument("--run-label", default="", help="written into every row")
        p.add_argument("--output", required=True, help="table CSV")
        p.add_argument("--pairs-output", required=True, help="per-pair CSV")

    p = sub.add_parser("neighbours", help="k-NN file over the pretraining set (knn.npz)")
    common(p)
    p.add_argument("--imagenet-root", required=True)
    p.add_argument("--k", type=int, required=True, help="neighbours per image (pretrain.knn_k)")
    p.add_argument("--output", required=True)
    p.add_argument("--state-dir", default=None, help="resumable feature parts (outside the outputs)")
    p.add_argument("--part-size", type=int, default=8192, help="images per resumable part")
    p.set_defaults(func=cmd_neighbours)

    p = sub.add_parser("table1", help="Table 1: video / generated / k-NN / random pairs")
    common(p)
    tables(p)
    p.add_argument("--bag", required=True, help="merged bag of the configured generator")
    p.add_argument("--generator", required=True, help="its registry name (views.generator)")
    p.add_argument("--imagenet-root", required=True)
    p.add_argument("--knn", required=True, help="knn.npz from the neighbours command")
    p.set_defaults(func=cmd_table1)

    p = sub.add_parser("table9", help="Table 9: real vs generated view per generator")
    common(p)
    tables(p)
    p.add_argument("--bag", type=_bag_arg, action="append", required=True, metavar="GENERATOR=PATH")
    p.set_defaults(func=cmd_table9)

    args = ap.parse_args(argv)
    if args.command == "table1" and not args.videos_root:
        ap.error("table1 needs --videos-root")
    setup_logging()
    set_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
