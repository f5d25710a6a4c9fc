r"""k nearest neighbours of every pretraining image by global embedding: the ``knn.npz`` that
``target=knn`` pretraining cells read (through ``pipeline.consistency.knn_file.read_knn``), and the
``neighbours`` command that writes it.

    python -m pipeline.consistency neighbours --imagenet-root R --settings JSON --k 5 --output knn.npz \
        [--state-dir S --part-size 8192]

``knn.npz``: ``image_id`` (N,) str in ``list_imagenet`` order, ``neighbours`` (N, k) int64 global
indices (nearest first, never the image itself, never an unreadable image; -1 in the row of an
unreadable image), ``similarity`` (N, k) float32 cosines (NaN there), ``encoder``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.consistency.options import (
    encoder_checkpoint,
    list_images,
    open_encoder,
    resolve_section,
    scoring_parser,
    scoring_settings,
    start,
)
from pipeline.consistency.sources import ImageListSource, iter_feature_batches
from pipeline.imaging import ImageRejects
from pipeline.io import atomic_path, write_npz_atomic
from pipeline.records import write_record
from pipeline.runtime import progress

LOG = logging.getLogger("cdgmae.consistency")


def nearest_neighbours(embeddings, k: int, device: str = "cpu", chunk: int = 1024):
    """Indices (N, k) int64 and cosine similarities (N, k) of each row's k nearest other rows.

    Cosine similarity of the global embeddings, computed ``chunk`` queries at a time; an image is
    never its own neighbour (its diagonal entry is set to -inf before top-k). A NaN row is a
    skipped (unreadable) image: never anyone's neighbour, and its own row is -1 / NaN.
    """
    n = embeddings.shape[0]
    skipped = torch.isnan(embeddings).any(dim=1).to(device)
    usable = n - int(skipped.sum())
    if k >= usable:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} readable images, got {usable}")
    bank = F.normalize(embeddings.float().to(device), dim=-1, eps=1e-8)  # (N, C)
    idx_out = torch.empty(n, k, dtype=torch.int64)
    sim_out = torch.empty(n, k, dtype=torch.float32)
    for s in progress(range(0, n, chunk), desc="k-NN", unit="chunk"):
        q = bank[s : s + chunk]  # (c, C)
        sim = q @ bank.T  # (c, N)
        rows = torch.arange(q.shape[0], device=device)
        sim[rows, rows + s] = -math.inf  # never self
        sim[:, skipped] = -math.inf  # never a skipped image
        top = sim.topk(k, dim=1)
        idx_out[s : s + chunk] = top.indices.cpu()
        sim_out[s : s + chunk] = top.values.cpu()
    idx_out[skipped.cpu()] = -1
    sim_out[skipped.cpu()] = math.nan
    return idx_out, sim_out


def _fingerprint(encoder_settings: dict, image_ids: Sequence[str], part_size: int) -> str:
    h = hashlib.sha256(json.dumps({"encoder": encoder_settings, "part_size": part_size}, sort_keys=True).encode())
    for i in image_ids:
        h.update(i.encode() + b"\n")
    return h.hexdigest()[:16]


def _load_part(path: Path | None, n_rows: int):
    """A finished part as a tensor, or None when absent, unreadable or incomplete. Its rows are
    finite, or all NaN for an image the run that wrote it skipped as unreadable."""
    if path is None or not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
        if arr.shape[0] == n_rows and (np.isfinite(arr).all(1) | np.isnan(arr).all(1)).all():
            return torch.from_numpy(arr)
    except (ValueError, OSError) as err:
        LOG.warning("re-computing unreadable part %s (%s)", path, err)
    return None


def global_embeddings(
    encoder,
    source: ImageListSource,
    batch_size: int,
    num_workers: int,
    state_dir: str | Path | None,
    encoder_settings: dict,
    part_size: int = 8192,
    max_reject_fraction: float | None = None,
):
    """(N, C) global embeddings of every pretraining image; resumable through ``state_dir``.

    Each part of ``part_size`` images is written atomically as ``part-XXXXXX.npy`` under a folder
    named by a fingerprint of the encoder settings and the image list, and skipped on restart when
    it loads with the expected row count. Descriptor encoders are centred on the whole set.
    Unreadable images follow the bad-image policy (``ImageRejects``, listed in
    ``<state_dir>/rejects.csv``): their rows are NaN.
    """
    n = len(source)
    ids = [source.image_id(i) for i in range(n)]
    folder = None
    if state_dir is not None:
        folder = Path(state_dir) / _fingerprint(encoder_settings, ids, part_size)
        folder.mkdir(parents=True, exist_ok=True)
        LOG.info("resumable feature parts in %s", folder)
    listing = Path(state_dir) / "rejects.csv" if state_dir is not None else None
    rejects = ImageRejects(n, max_reject_fraction, "k-NN images", listing)
    parts = []
    n_parts = (n + part_size - 1) // part_size
    for p in range(n_parts):
        keys = list(range(p * part_size, min(n, (p + 1) * part_size)))
        path = folder / f"part-{p:06d}.npy" if folder else None
        done = _load_part(path, len(keys))
        if done is not None:
            for j in torch.isnan(done).any(1).nonzero().flatten().tolist():
                rejects.add(keys[j], ids[keys[j]], source.describe(keys[j]), f"unreadable when {path.name} was made")
            parts.append(done)
            continue
        batches = iter_feature_batches(
            encoder, source, keys, batch_size, num_workers, f"part {p + 1}/{n_parts}", False, rejects
        )
        glob = torch.cat([f.global_tokens for _, f in batches])
        if path is not None:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, glob.numpy())
        parts.append(glob)
    if listing is not None:
        rejects.write(listing)
    emb = torch.cat(parts)
    if encoder.centre:
        emb = emb - emb.nanmean(0)  # = mean-pooled centred descriptors (skipped rows stay NaN)
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
    max_reject_fraction: float | None = None,
) -> dict:
    """The arrays of ``knn.npz`` for every image of ``source`` (-1 rows for skipped images)."""
    ids, emb = global_embeddings(
        encoder, source, batch_size, num_workers, state_dir, encoder_settings, part_size, max_reject_fraction
    )
    neighbours, sims = nearest_neighbours(emb, k, device=encoder.device)
    return {
        "image_id": np.asarray(ids),
        "neighbours": neighbours.numpy().astype(np.int64),
        "similarity": sims.numpy(),
        "encoder": np.asarray(encoder.name),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.consistency neighbours``: write knn.npz."""
    p = scoring_parser("neighbours", __doc__)
    p.add_argument("--imagenet-root", required=True)
    p.add_argument("--k", type=int, required=True, help="neighbours per image (pretrain.knn_k)")
    p.add_argument("--output", required=True)
    p.add_argument("--state-dir", default=None, help="resumable feature parts (outside the outputs)")
    p.add_argument("--part-size", type=int, default=8192, help="images per resumable part")
    p.add_argument(
        "--max-reject-fraction",
        type=float,
        default=None,
        help="unreadable images allowed before failing (default: views.max_reject_fraction's default); "
        "they are skipped, logged and listed in <state-dir>/rejects.csv",
    )
    args = p.parse_args(argv)
    start(args)
    cfg = resolve_section(args)
    encoder = open_encoder(cfg, args.device)
    images = list_images(args.imagenet_root)
    out = find_neighbours(
        encoder,
        images,
        args.k,
        cfg["encoder"]["batch_size"],
        cfg["num_workers"],
        cfg["encoder"],
        args.state_dir,
        args.part_size,
        args.max_reject_fraction,
    )
    write_npz_atomic(args.output, out)
    write_record(
        args.output,
        kind="knn",
        command=("consistency", "neighbours"),
        inputs=[args.imagenet_root, encoder_checkpoint(cfg)],
        settings={**scoring_settings(cfg, args), "k": args.k},
        device=encoder.device,
        precision="fp32",
    )
    LOG.info("wrote %s: %d images x %d neighbours", args.output, *out["neighbours"].shape)
