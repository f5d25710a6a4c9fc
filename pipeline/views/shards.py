"""Bag-of-views stage: generate (one shard), merge (all shards) and figure; ``BagDataset``.

``python -m pipeline.views.shards generate``
    Views for one shard = a contiguous range of global indices of ``list_imagenet(root)`` made of
    whole parts (see ``shard_range``); batches are formed inside a part. Work is
    committed in atomic part files of ``part_size`` source images under a state directory outside
    the declared outputs (``results/views/<generator>/parts/shard-<k>/``); on restart a part that
    opens cleanly, carries ``complete`` and the expected row count and the same settings
    fingerprint is reused, so a killed job redoes at most the part it was writing. The shard file
    is then assembled atomically from the parts.

``python -m pipeline.views.shards merge``
    Validates every shard (present, complete, row count and index range vs the manifest, same
    settings) and writes ``bag.h5`` as real datasets (``copy``) or an HDF5 virtual dataset
    (``vds``, a missing source would read as fill values, hence the validation here and in
    ``BagDataset``).

``python -m pipeline.views.shards figure``
    Real image + its views for a few images (the paper's Figure 5).

Storage (shard and bag): ``real`` (N,) and ``views`` (N, M) vlen uint8 JPEG bytes, ``image_id``
(N,) str, ``index`` (N,) int64 global index, ``seed`` (N, M) int64 seeds actually used; attributes
``generator``, ``settings`` (JSON), ``is_baseline``, ``n_views``, ``jpeg_quality``,
``expected_rows``, ``complete``.

Real images: short side resized to ``image_size`` (PIL bicubic, antialiased) and centre-cropped,
then used both as the generator's condition and as the stored real image, so real image and views
share one resolution.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.config import load_settings, section_defaults
from pipeline.devices import set_threads
from pipeline.imaging import load_square
from pipeline.io import atomic_path, write_csv_atomic
from pipeline.runtime import derive_seed, progress, setup_logging

LOG = logging.getLogger("cdgmae.views")

FORMAT_VERSION = 1
MAX_REGENERATE = 8  # attempts to replace a non-finite view before giving up
ROW_CHUNK = 64  # rows per HDF5 chunk of the vlen datasets (one chunk = 64 heap references)
REJECT_COLUMNS = ["index", "image_id", "path", "reason"]


class ViewsError(RuntimeError):
    """A shard or bag failed validation; the message names the file and the problem."""


# ----------------------------------------------------------------------------- helpers


def shard_range(n_images: int, shard: int, shards: int, part_size: int) -> tuple[int, int]:
    """Global index range [start, end) of ``shard``: a contiguous run of whole parts.

    Parts tile the global index space in blocks of ``part_size`` and shards take contiguous runs of
    parts, so part (and batch) composition depends only on the global index, never on the shard
    count: a diffusion generator's float kernels can depend on the batch it runs in, so this keeps
    the stored bytes identical whatever ``views.shards`` is. Trailing shards may be empty when
    there are fewer parts than shards.
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for views.shards = {shards}")
    n_parts = -(-n_images // part_size)
    p0, p1 = shard * n_parts // shards, (shard + 1) * n_parts // shards
    return min(p0 * part_size, n_images), min(p1 * part_size, n_images)


def encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> 1-D uint8 array of JPEG bytes (libjpeg: deterministic)."""
    import cv2

    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.reshape(-1)


def decode_jpeg(data) -> np.ndarray:
    """1-D uint8 JPEG bytes -> (H, W, 3) uint8 RGB."""
    import cv2

    img = cv2.imdecode(np.asarray(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("corrupt JPEG blob")
    return img[..., ::-1].copy()


def to_uint8(view: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(view * 255.0), 0, 255).astype(np.uint8)


def view_seed(seed: int, image_id: str, view: int, attempt: int = 0) -> int:
    """Seed of view ``view`` of ``image_id``; ``attempt`` > 0 for regenerations of a bad view."""
    if attempt == 0:
        return derive_seed(seed, image_id, view)
    return derive_seed(seed, image_id, view, attempt)


def fingerprint(generator: str, cfg: dict, seed: int) -> str:
    """Hash of everything that determines the stored bytes (not batch size, shards or parts).

    Editing pipeline/views.py or generators.py re-runs generate_views (they are its code inputs),
    but finished parts are reused unless this fingerprint changes (bump ``FORMAT_VERSION`` or the
    generator's ``version`` when the bytes change), so a cosmetic edit costs only re-assembly.
    """
    from pipeline.views.generators import GENERATORS

    key = {
        "format": FORMAT_VERSION,
        "generator": generator,
        "seed": int(seed),
        "generator_version": getattr(GENERATORS.get(generator), "version", None),
        "n_views": cfg["n_views"],
        "image_size": cfg["image_size"],
        "jpeg_quality": cfg["jpeg_quality"],
        "generator_settings": cfg["generators"][generator],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _vlen_u8():
    import h5py

    return h5py.vlen_dtype(np.dtype(np.uint8))


def _create(f, name, data, dtype=None):
    """Create a dataset; vlen/str datasets chunked by rows so a row read touches one chunk."""
    n = len(data)
    shape = (n,) + tuple(np.shape(data)[1:]) if dtype is None else np.shape(data)
    chunks = None
    if dtype is not None and n > 0:
        chunks = (min(n, ROW_CHUNK),) + tuple(shape[1:])
    return f.create_dataset(
        name, shape=shape, dtype=dtype or np.asarray(data).dtype, data=data if n else None, chunks=chunks
    )


def _obj_array(blobs: Sequence, shape: tuple) -> np.ndarray:
    arr = np.empty(shape, dtype=object)
    flat = arr.reshape(-1)
    for i, b in enumerate(blobs):
        flat[i] = b
    return arr


def write_rows(f, real: list, views: list, image_ids: list, index: list, seeds: list, M: int):
    """Write the row datasets of a part/shard file (N rows, M views per row)."""
    import h5py

    N = len(image_ids)
    _create(f, "real", _obj_array(real, (N,)), _vlen_u8())
    _create(f, "views", _obj_array([v for row in views for v in row], (N, M)), _vlen_u8())
    _create(f, "image_id", np.array(image_ids, dtype=object), h5py.string_dtype())
    f.create_dataset("index", data=np.asarray(index, dtype=np.int64).reshape(N))
    f.create_dataset("seed", data=np.asarray(seeds, dtype=np.int64).reshape(N, M))


# ----------------------------------------------------------------------------- generate


class ShardWriter:
    """Generate one shard as resumable atomic parts, then assemble ``shard-<k>.h5``."""

    def __init__(
        self,
        records,
        generator: str,
        shard: int,
        cfg: dict,
        seed: int,
        out: Path,
        rejects: Path,
        state_dir: Path,
        batch_size: int | None = None,
        device: str | None = None,
    ):
        self.records = records
        self.generator_name = generator
        self.shard = int(shard)
        self.cfg = cfg
        self.seed = int(seed)
        self.out = Path(out)
        self.rejects_path = Path(rejects)
        self.state_dir = Path(state_dir)
        self.batch_size = int(batch_size or cfg["batch_size"])
        self.device = device
        self.M = int(cfg["n_views"])
        self.size = int(cfg["image_size"])
        self.quality = int(cfg["jpeg_quality"])
        n = len(records) if cfg["max_images"] is None else min(len(records), cfg["max_images"])
        self.n_total = n
        self.start, self.end = shard_range(n, self.shard, int(cfg["shards"]), int(cfg["part_size"]))
        self.fp = fingerprint(generator, cfg, seed)
        self._gen = None
        self.parts_written = 0
        self.parts_reused = 0

    # -- generator is built lazily: a fully resumed shard never loads weights
    @property
    def gen(self):
        if self._gen is None:
            from pipeline.views.generators import build_generator

            self._gen = build_generator(
                self.generator_name,
                self.cfg["generators"][self.generator_name],
                image_size=self.size,
                device=self.device,
            )
        return self._gen

    def part_ranges(self) -> list[tuple[int, int]]:
        P = int(self.cfg["part_size"])
        return [(s, min(s + P, self.end)) for s in range(self.start, self.end, P)]

    def part_path(self, j: int) -> Path:
        return self.state_dir / f"part-{j:05d}.h5"

    def _ids_hash(self, lo: int, hi: int) -> str:
        h = hashlib.sha256()
        for r in self.records[lo:hi]:
            h.update(r.image_id.encode() + b"\0")
        return h.hexdigest()[:16]

    def part_ok(self, path: Path, lo: int, hi: int) -> bool:
        """Integrity, not existence: opens, complete, same settings and sources, row counts add up."""
        import h5py

        if not path.exists():
            return False
        try:
            with h5py.File(path, "r") as f:
                a = f.attrs
                rows = int(a["expected_rows"])
                ok = (
                    bool(a["complete"])
                    and a["fingerprint"] == self.fp
                    and int(a["index_start"]) == lo
                    and int(a["index_end"]) == hi
                    and a["sources_hash"] == self._ids_hash(lo, hi)
                    and rows + len(f["reject_index"]) == hi - lo
                    and all(len(f[k]) == rows for k in ("real", "views", "image_id", "index", "seed"))
                    and f["views"].shape[1:] == (self.M,)
                )
        except Exception as err:  # truncated superblock, missing key, ...: redo the part
            LOG.warning("part %s is unreadable (%s): redoing it", path, err)
            return False
        if not ok:
            LOG.warning("part %s is incomplete or stale: redoing it", path)
        return ok

    def _generate_batch(self, reals: list[np.ndarray], ids: list[str]):
        """Views for a batch; non-finite views regenerated one by one with new recorded seeds."""
        seeds = np.array([[view_seed(self.seed, i, m) for m in range(self.M)] for i in ids], dtype=np.int64)
        views = self.gen.generate(np.stack(reals), seeds)  # (B, M, S, S, 3) float
        for b, m in zip(*np.nonzero(~np.isfinite(views).reshape(len(ids), self.M, -1).all(-1))):
            for attempt in range(1, MAX_REGENERATE + 1):
                s = view_seed(self.seed, ids[b], int(m), attempt)
                v = self.gen.generate(reals[b][None], np.array([[s]], np.int64))[0, 0]
                if np.isfinite(v).all():
                    LOG.warning("non-finite view %d of %s regenerated with seed %d", m, ids[b], s)
                    views[b, m], seeds[b, m] = v, s
                    break
            else:
                raise ViewsError(
                    f"view {m} of {ids[b]} is non-finite after {MAX_REGENERATE} "
                    "regenerations (check dtype: use bfloat16/float32)"
                )
        return views, seeds

    def load_part(self, lo: int, hi: int):
        """Decode the sources of [lo, hi): (reals, ids, global indices, rejects)."""
        reals, ids, index, rej = [], [], [], []
        for i in range(lo, hi):
            rec = self.records[i]
            try:
                reals.append(load_square(rec.path, self.size))
                ids.append(rec.image_id)
                index.append(i)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ...
                LOG.warning("rejecting %s: %s", rec.path, err)
                rej.append((i, rec.image_id, str(rec.path), f"{type(err).__name__}: {err}"))
        return reals, ids, index, rej

    def _encode(self, reals, views):
        real_jpg = [encode_jpeg(r, self.quality) for r in reals]
        view_jpg = [[encode_jpeg(to_uint8(v), self.quality) for v in row] for row in views]
        return real_jpg, view_jpg

    def write_part(self, j: int, lo: int, hi: int, loaded, pool, bar, n_rejects_before: int) -> int:
        """Generate and commit part ``j``; JPEG encoding runs in ``pool`` behind the generator."""
        import h5py

        reals, ids, index, rej = loaded
        bar.update(len(rej))
        self._check_rejects(n_rejects_before + len(rej), final=False)
        encoded, seeds = [], []
        for b0 in range(0, len(ids), self.batch_size):
            batch_ids = ids[b0 : b0 + self.batch_size]
            batch_real = reals[b0 : b0 + self.batch_size]
            views, s = self._generate_batch(batch_real, batch_ids)
            encoded.append(pool.submit(self._encode, batch_real, views))
            seeds.extend(s)
            bar.update(len(batch_ids))
        real_jpg, view_jpg = [], []
        for fut in encoded:  # in submission order: row order is the global index order
            r, v = fut.result()
            real_jpg.extend(r)
            view_jpg.extend(v)
        with atomic_path(self.part_path(j)) as tmp:
            with h5py.File(tmp, "w") as f:
                write_rows(f, real_jpg, view_jpg, ids, index, seeds, self.M)
                f.create_dataset("reject_index", data=np.array([r[0] for r in rej], np.int64))
                for k, col in (("reject_image_id", 1), ("reject_path", 2), ("reject_reason", 3)):
                    f.create_dataset(k, data=np.array([r[col] for r in rej], object), dtype=h5py.string_dtype())
                f.attrs.update(
                    fingerprint=self.fp,
                    index_start=lo,
                    index_end=hi,
                    sources_hash=self._ids_hash(lo, hi),
                    expected_rows=len(ids),
                )
                f.attrs["complete"] = True  # last: a part without it is never trusted
        return len(rej)

    def _check_rejects(self, n_rejects: int, final: bool) -> None:
        n = self.end - self.start
        limit = float(self.cfg["max_reject_fraction"]) * n
        if n_rejects > limit:
            raise ViewsError(
                f"shard {self.shard}: {n_rejects} of {n} source images rejected, above "
                f"views.max_reject_fraction = {self.cfg['max_reject_fraction']}; reasons are listed "
                f"in the job log and in {self.state_dir}/rejects.csv" + ("" if final else " (stopped early)")
            )

    def run(self) -> Path:

        self.state_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.state_dir.glob(".*.tmp"):  # left by a killed writer (atomic_path)
            stale.unlink()
        parts = self.part_ranges()
        LOG.info(
            "shard %d: global indices [%d, %d) of %d images, %d parts, generator %s",
            self.shard,
            self.start,
            self.end,
            self.n_total,
            len(parts),
            self.generator_name,
        )
        done = [self.part_ok(self.part_path(j), lo, hi) for j, (lo, hi) in enumerate(parts)]
        initial = sum(hi - lo for (lo, hi), d in zip(parts, done) if d)
        n_rejects = sum(self._part_rejects(self.part_path(j)) for j, d in enumerate(done) if d)
        bar = progress(
            total=self.end - self.start,
            initial=initial,
            unit="img",
            desc=f"views {self.generator_name} shard {self.shard}",
        )
        todo = [(j, lo, hi) for j, (lo, hi) in enumerate(parts) if not done[j]]
        for j in (j for j, d in enumerate(done) if d):
            LOG.info("reusing complete part %s", self.part_path(j).name)
        self.parts_reused = sum(done)
        # source decoding of the next part and JPEG encoding overlap with generation (PIL, cv2
        # and torch release the GIL); parts are still committed one at a time, in order
        with ThreadPoolExecutor(max_workers=2) as pool:
            try:
                nxt = pool.submit(self.load_part, *todo[0][1:]) if todo else None
                for pos, (j, lo, hi) in enumerate(todo):
                    loaded = nxt.result()
                    nxt = pool.submit(self.load_part, *todo[pos + 1][1:]) if pos + 1 < len(todo) else None
                    n_rejects += self.write_part(j, lo, hi, loaded, pool, bar, n_rejects)
                    self.parts_written += 1
                    LOG.info("wrote part %s", self.part_path(j).name)
            finally:
                bar.close()
        return self.assemble(parts)

    @staticmethod
    def _part_rejects(path: Path) -> int:
        import h5py

        with h5py.File(path, "r") as f:
            return len(f["reject_index"])

    def assemble(self, parts) -> Path:
        """Concatenate the parts into the shard file and write the rejects CSV (both atomic)."""
        import h5py
        import pandas as pd

        real, views, ids, index, seeds, rej = [], [], [], [], [], []
        for j in range(len(parts)):
            with h5py.File(self.part_path(j), "r") as f:
                real.extend(f["real"][:])
                views.extend(list(row) for row in f["views"][:])
                ids.extend(s.decode() if isinstance(s, bytes) else s for s in f["image_id"][:])
                index.extend(f["index"][:])
                seeds.extend(f["seed"][:])
                rej.extend(
                    zip(
                        f["reject_index"][:],
                        *(f[k].asstr()[:] for k in ("reject_image_id", "reject_path", "reject_reason")),
                    )
                )
        rejects = pd.DataFrame(rej, columns=REJECT_COLUMNS)
        write_csv_atomic(rejects, self.state_dir / "rejects.csv")
        self._check_rejects(len(rejects), final=True)
        write_csv_atomic(rejects, self.rejects_path)
        settings = {
            "generator": self.generator_name,
            "seed": self.seed,
            "n_views": self.M,
            "image_size": self.size,
            "jpeg_quality": self.quality,
            "generator_settings": self.cfg["generators"][self.generator_name],
            "real_preprocessing": "short side -> image_size (PIL bicubic), centre crop",
            "seed_rule": "derive_seed(seed, image_id, view[, attempt])",
        }
        from pipeline.views.generators import GENERATORS

        with atomic_path(self.out) as tmp:
            with h5py.File(tmp, "w") as f:
                write_rows(f, real, views, ids, index, seeds, self.M)
                f.attrs.update(
                    generator=self.generator_name,
                    settings=json.dumps(settings, sort_keys=True),
                    is_baseline=bool(GENERATORS[self.generator_name].is_baseline),
                    n_views=self.M,
                    jpeg_quality=self.quality,
                    image_size=self.size,
                    expected_rows=len(ids),
                    n_rejects=len(rejects),
                    n_sources=self.end - self.start,
                    index_start=self.start,
                    index_end=self.end,
                    n_images_total=self.n_total,
                    shard=self.shard,
                    shards=int(self.cfg["shards"]),
                    fingerprint=self.fp,
                    format_version=FORMAT_VERSION,
                )
                f.attrs["complete"] = True
        LOG.info(
            "shard %d: %d rows, %d rejects -> %s (%d parts written, %d reused)",
            self.shard,
            len(ids),
            len(rejects),
            self.out,
            self.parts_written,
            self.parts_reused,
        )
        return self.out


def resolve_settings(settings_arg: str | None) -> dict:
    """The ``views`` section: ``--settings`` (partial) completed from the schema defaults."""
    return section_defaults("views", overrides=load_settings(settings_arg))


def cmd_generate(args) -> None:
    from pipeline.data.readers import list_imagenet

    cfg = resolve_settings(args.settings)
    records = list_imagenet(args.root)
    out = Path(args.out)
    state = Path(args.state_dir) if args.state_dir else out.parent / "parts" / f"shard-{args.shard}"
    rejects = Path(args.rejects) if args.rejects else out.with_suffix(".rejects.csv")
    ShardWriter(
        records,
        args.generator,
        args.shard,
        cfg,
        args.seed,
        out,
        rejects,
        state,
        batch_size=args.batch_size,
        device=args.device,
    ).run()


# ----------------------------------------------------------------------------- merge


def validate_shard(path: Path, k: int, shards: int, expected: tuple[int, int] | None = None) -> dict:
    """Open a shard, check it is complete and self-consistent; return its attributes."""
    import h5py

    if not path.exists():
        raise ViewsError(f"missing shard {k} of {shards}: {path}")
    try:
        with h5py.File(path, "r") as f:
            a = dict(f.attrs)
            lens = {key: len(f[key]) for key in ("real", "views", "image_id", "index", "seed")}
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


def merge_shards(
    shard_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    n_images: int | None = None,
    part_size: int | None = None,
    mode: str = "copy",
) -> Path:
    """Validate all shards and write the merged bag (copy into real datasets, or a VDS)."""
    import h5py

    shard_paths = [Path(p) for p in shard_paths]
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
    rows = [int(a["expected_rows"]) for a in attrs]
    N, M = sum(rows), int(attrs[0]["n_views"])
    out = Path(out)
    common = {
        k: attrs[0][k]
        for k in (
            "generator",
            "settings",
            "is_baseline",
            "n_views",
            "jpeg_quality",
            "image_size",
            "fingerprint",
            "format_version",
        )
    }
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            if mode == "copy":
                cols = {k: [] for k in ("real", "views", "image_id", "index", "seed")}
                for p in shard_paths:
                    with h5py.File(p, "r") as s:
                        for k in cols:
                            cols[k].append(s[k].asstr()[:] if k == "image_id" else s[k][:])
                cat = {k: np.concatenate(v) if v else v for k, v in cols.items()}
                write_rows(
                    f,
                    list(cat["real"]),
                    [list(r) for r in cat["views"]],
                    list(cat["image_id"]),
                    cat["index"],
                    cat["seed"],
                    M,
                )
            elif mode == "vds":
                # source paths relative to the bag: resolved against the VDS file's own folder
                for key, shape_tail, dtype in (
                    ("real", (), _vlen_u8()),
                    ("views", (M,), _vlen_u8()),
                    ("image_id", (), h5py.string_dtype()),
                    ("index", (), np.int64),
                    ("seed", (M,), np.int64),
                ):
                    layout = h5py.VirtualLayout(shape=(N,) + shape_tail, dtype=dtype)
                    r0 = 0
                    for p, n in zip(shard_paths, rows):
                        if n:
                            src = h5py.VirtualSource(
                                os.path.relpath(p, out.parent), key, shape=(n,) + shape_tail, dtype=dtype
                            )
                            layout[r0 : r0 + n] = src
                        r0 += n
                    f.create_virtual_dataset(key, layout)
            else:
                raise ValueError(f"unknown merge mode {mode!r} (copy, vds)")
            f.attrs.update(common)
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


def cmd_merge(args) -> None:
    cfg = resolve_settings(args.settings)
    n_images = None
    if args.root:
        from pipeline.data.readers import list_imagenet

        n = len(list_imagenet(args.root))
        n_images = n if cfg["max_images"] is None else min(n, cfg["max_images"])
    if len(args.shards) != cfg["shards"]:
        raise ViewsError(f"{len(args.shards)} shard files given, views.shards = {cfg['shards']}")
    merge_shards(
        args.shards, args.out, n_images=n_images, part_size=int(cfg["part_size"]), mode=args.mode or cfg["merge_mode"]
    )


# ----------------------------------------------------------------------------- dataset


class BagDataset:
    """Bags of views from a shard or merged ``bag.h5`` (torch ``Dataset`` protocol).

    Item: ``{"image_id": str, "index": int, "real": (H, W, 3) uint8, "views": [M x (H, W, 3) uint8]}``,
    passed through ``transform(item)`` when given. The HDF5 file is opened lazily, once per
    process (DataLoader worker), never in ``__init__``: h5py handles must not cross a fork or be
    pickled.
    """

    def __init__(self, path: str | os.PathLike, transform=None):
        import h5py

        self.path = Path(path)
        self.transform = transform
        if not self.path.exists():
            raise FileNotFoundError(f"bag of views not found: {self.path}")
        with h5py.File(self.path, "r") as f:
            a = f.attrs
            if not a.get("complete", False):
                raise ViewsError(f"{self.path} is incomplete (attribute complete is not set)")
            self._len = len(f["index"])
            if self._len != int(a["expected_rows"]):
                raise ViewsError(f"{self.path}: {self._len} rows != expected_rows {a['expected_rows']}")
            for key in ("real", "views"):  # a VDS reads missing sources as fill values
                ds = f[key]
                if ds.is_virtual:
                    for vs in ds.virtual_sources():
                        src = self.path.parent / vs.file_name
                        if not src.exists():
                            raise ViewsError(f"{self.path}: virtual source {src} is missing")
            self.generator = str(a["generator"])
            self.is_baseline = bool(a["is_baseline"])
            self.n_views = int(a["n_views"])
            self.settings = json.loads(a["settings"])
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return self._len

    def _h5(self):
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getitem__(self, i: int) -> dict:
        if not -self._len <= i < self._len:
            raise IndexError(f"bag index {i} out of range [0, {self._len})")
        i = int(i) % self._len
        f = self._h5()
        image_id = f["image_id"][i]
        item = {
            "image_id": image_id.decode() if isinstance(image_id, bytes) else str(image_id),
            "index": int(f["index"][i]),
            "real": decode_jpeg(f["real"][i]),
            "views": [decode_jpeg(b) for b in f["views"][i]],
        }
        return self.transform(item) if self.transform is not None else item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------- figure


def plot_bag(bag: str | os.PathLike, out: str | os.PathLike, n_images: int = 4, seed: int = 0):
    """Figure 5 style grid: one row per image, real image then its M views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = BagDataset(bag)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(ds), size=min(n_images, len(ds)), replace=False).tolist())
    M = ds.n_views
    fig, axes = plt.subplots(len(picks), M + 1, figsize=(1.8 * (M + 1), 1.8 * len(picks) + 0.6), squeeze=False)
    for r, i in enumerate(picks):
        item = ds[i]
        for c, img in enumerate([item["real"]] + item["views"]):
            ax = axes[r, c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("real" if c == 0 else f"view {c}", fontsize=9)
        axes[r, 0].set_ylabel(item["image_id"], fontsize=7)
    title = f"Bag of views, generator: {ds.generator}"
    if ds.is_baseline:
        title += "\n(weights-free BASELINE pseudo-views, not CDG-MAE diffusion views)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    ds.close()
    return Path(out)


def cmd_figure(args) -> None:
    plot_bag(args.bag, args.out, n_images=args.n_images, seed=args.seed)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.views.shards", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate one shard of views (resumable)")
    g.add_argument("--root", required=True, help="ImageNet-layout root (holds train/<class>/)")
    g.add_argument("--generator", required=True, help="registry name: sd-variation, sldm, warp, crop")
    g.add_argument("--shard", type=int, required=True)
    g.add_argument("--out", required=True, help="results/views/<generator>/shard-<k>.h5")
    g.add_argument("--rejects", help="rejects CSV (default: <out>.rejects.csv)")
    g.add_argument("--state-dir", help="part files (default: <out dir>/parts/shard-<k>)")
    g.add_argument("--settings", help="views section (JSON or file); missing keys from the schema")
    g.add_argument("--seed", type=int, default=0, help="base seed of the workflow")
    g.add_argument(
        "--batch-size",
        type=int,
        help="images per generator call (default: views.batch_size); does not change the output",
    )
    g.add_argument("--device", help="torch device (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="validate all shards and write bag.h5")
    m.add_argument("--shards", nargs="+", required=True, help="shard files in shard order")
    m.add_argument("--out", required=True)
    m.add_argument("--root", help="source root: check each shard's range against the manifest")
    m.add_argument("--settings", help="views section (JSON or file)")
    m.add_argument("--mode", choices=["copy", "vds"], help="default: views.merge_mode")
    m.add_argument("--threads", type=int, default=None)
    m.set_defaults(func=cmd_merge)

    fg = sub.add_parser("figure", help="bag-of-views figure (paper Figure 5)")
    fg.add_argument("--bag", required=True)
    fg.add_argument("--out", required=True)
    fg.add_argument("--n-images", type=int, default=4)
    fg.add_argument("--seed", type=int, default=0)
    fg.add_argument("--threads", type=int, default=None)
    fg.set_defaults(func=cmd_figure)

    args = ap.parse_args(argv)
    setup_logging()
    set_threads(args.threads)
    try:
        args.func(args)
    except ViewsError as err:
        LOG.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
