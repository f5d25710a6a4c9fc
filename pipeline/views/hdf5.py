"""The HDF5 layout of part, shard and bag files: what the writer and the reader share.

Rows: ``real`` (N,) and ``views`` (N, M) vlen uint8 JPEG bytes, ``image_id`` (N,) str, ``index``
(N,) int64 global index, ``seed`` (N, M) int64 seeds actually used. Shard and bag attributes:
``generator``, ``settings`` (JSON), ``is_baseline``, ``n_views``, ``jpeg_quality``,
``expected_rows``, ``complete`` (written last: a file without it is never trusted). Parts and
shards also hold their rejected sources (``REJECT_KEYS``). Every part, shard and bag has a
recorded content digest (``pipeline.io``), checked by ``verify_view_file`` wherever one is read.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import h5py
import numpy as np

from pipeline.devices import set_threads
from pipeline.io import IntegrityError, verify_digest
from pipeline.runtime import setup_logging

LOG = logging.getLogger("cdgmae.views")

FORMAT_VERSION = 1
ROW_CHUNK = 64  # rows per HDF5 chunk of the vlen datasets (one chunk = 64 heap references)
ROW_KEYS = ("real", "views", "image_id", "index", "seed")  # the datasets with one entry per row
REJECT_COLUMNS = ["index", "image_id", "path", "reason"]
# the rejected sources of a part or shard, one entry per reject (REJECT_COLUMNS, in that order)
REJECT_KEYS = ("reject_index", "reject_image_id", "reject_path", "reject_reason")


class ViewsError(RuntimeError):
    """A shard or bag failed validation; the message names the file and the problem."""


def run_command(action: Callable[[], object], threads: int | None) -> None:
    """Run a views command: logging, intra-op threads, a ``ViewsError`` or ``IntegrityError`` as one
    log line naming the file, and exit 1."""
    setup_logging()
    set_threads(threads)
    try:
        action()
    except (ViewsError, IntegrityError) as err:
        LOG.error("%s", err)
        sys.exit(1)


def virtual_sources(path: str | Path) -> list[Path]:
    """The distinct files the row datasets of ``path`` map (a VDS bag: its shards), in order.

    Source names are resolved against the file's own folder, as HDF5 does for relative names."""
    path = Path(path)
    sources: list[Path] = []
    with h5py.File(path, "r") as f:
        for key in ROW_KEYS:
            if key in f and f[key].is_virtual:
                for vs in f[key].virtual_sources():
                    src = path if vs.file_name == "." else path.parent / vs.file_name
                    if src not in sources:
                        sources.append(src)
    return sources


def verify_view_file(path: str | Path) -> list[Path]:
    """Verify a part, shard or bag file against its recorded digest, and a VDS bag's sources too.

    Returns the files verified (``path`` first). A missing or mismatching digest, or a missing
    virtual source, raises ``pipeline.io.IntegrityError`` naming the file: a VDS would read a
    missing source as fill values and a corrupt one as wrong images, never as an error.
    """
    path = Path(path)
    verify_digest(path)
    verified = [path]
    for src in virtual_sources(path):
        if src == path:
            continue
        if not src.exists():
            raise IntegrityError(f"{path}: virtual source {src} is missing")
        verified.extend(verify_view_file(src))
    return verified


def encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> 1-D uint8 array of JPEG bytes (libjpeg: deterministic)."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.reshape(-1)


def decode_jpeg(data) -> np.ndarray:
    """1-D uint8 JPEG bytes -> (H, W, 3) uint8 RGB."""
    img = cv2.imdecode(np.asarray(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("corrupt JPEG blob")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: same values, ~35% faster


def vlen_u8():
    """The dtype of one JPEG blob: variable-length uint8."""
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
    N = len(image_ids)
    _create(f, "real", _obj_array(real, (N,)), vlen_u8())
    _create(f, "views", _obj_array([v for row in views for v in row], (N, M)), vlen_u8())
    _create(f, "image_id", np.array(image_ids, dtype=object), h5py.string_dtype())
    f.create_dataset("index", data=np.asarray(index, dtype=np.int64).reshape(N))
    f.create_dataset("seed", data=np.asarray(seeds, dtype=np.int64).reshape(N, M))


def create_row_datasets(f, n: int, M: int) -> None:
    """Empty row datasets for ``n`` rows, filled by ``copy_rows`` (the layout ``write_rows`` makes)."""
    chunk = (min(n, ROW_CHUNK),) if n else None
    f.create_dataset("real", shape=(n,), dtype=vlen_u8(), chunks=chunk)
    f.create_dataset("views", shape=(n, M), dtype=vlen_u8(), chunks=chunk and chunk + (M,))
    f.create_dataset("image_id", shape=(n,), dtype=h5py.string_dtype(), chunks=chunk)
    f.create_dataset("index", shape=(n,), dtype=np.int64)
    f.create_dataset("seed", shape=(n, M), dtype=np.int64)


def copy_rows(src, r0: int, r1: int, dst, at: int) -> int:
    """Copy rows [r0, r1) of the open file ``src`` into ``dst`` from row ``at``; return the count.

    Streams ``ROW_CHUNK`` rows at a time, so memory is bounded by one chunk of JPEGs whatever the
    file sizes; blocks start at ``r0`` so the same rows copied from a part or from a larger file
    holding them make the same writes (and the same bytes)."""
    for a in range(r0, r1, ROW_CHUNK):
        b = min(a + ROW_CHUNK, r1)
        for key in ROW_KEYS:
            # write_direct: slice assignment of a vlen block whose blobs share one length (one
            # row, say) is read by h5py as a 2-D array and refused
            dst[key].write_direct(src[key][a:b], dest_sel=np.s_[at + a - r0 : at + b - r0])
    return r1 - r0


def write_rejects(f, rejects: Sequence[tuple]) -> None:
    """The ``REJECT_KEYS`` datasets from (index, image_id, path, reason) tuples."""
    f.create_dataset("reject_index", data=np.array([r[0] for r in rejects], np.int64))
    for col, key in enumerate(REJECT_KEYS[1:], start=1):
        f.create_dataset(key, data=np.array([r[col] for r in rejects], object), dtype=h5py.string_dtype())


def read_rejects(f, j0: int = 0, j1: int | None = None) -> list[tuple]:
    """Rejects [j0, j1) of an open part or shard as (index, image_id, path, reason) tuples."""
    index = f["reject_index"][j0:j1]
    return list(zip(index.tolist(), *(f[key].asstr()[j0:j1] for key in REJECT_KEYS[1:])))


def read_rows(paths: Sequence) -> dict:
    """The rows of several part/shard files, concatenated in order, as ``write_rows`` keywords."""
    rows = {"real": [], "views": [], "image_ids": [], "index": [], "seeds": []}
    for path in paths:
        with h5py.File(path, "r") as f:
            rows["real"].extend(f["real"][:])
            rows["views"].extend(list(row) for row in f["views"][:])
            rows["image_ids"].extend(f["image_id"].asstr()[:])
            rows["index"].extend(f["index"][:])
            rows["seeds"].extend(f["seed"][:])
    return rows
