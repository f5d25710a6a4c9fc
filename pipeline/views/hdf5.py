"""The HDF5 layout of part, shard and bag files: what the writer and the reader share.

Rows: ``real`` (N,) and ``views`` (N, M) vlen uint8 JPEG bytes, ``image_id`` (N,) str, ``index``
(N,) int64 global index, ``seed`` (N, M) int64 seeds actually used. Shard and bag attributes:
``generator``, ``settings`` (JSON), ``is_baseline``, ``n_views``, ``jpeg_quality``,
``expected_rows``, ``complete`` (written last: a file without it is never trusted).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

import cv2
import h5py
import numpy as np

from pipeline.devices import set_threads
from pipeline.runtime import setup_logging

LOG = logging.getLogger("cdgmae.views")

FORMAT_VERSION = 1
ROW_CHUNK = 64  # rows per HDF5 chunk of the vlen datasets (one chunk = 64 heap references)
ROW_KEYS = ("real", "views", "image_id", "index", "seed")  # the datasets with one entry per row
REJECT_COLUMNS = ["index", "image_id", "path", "reason"]


class ViewsError(RuntimeError):
    """A shard or bag failed validation; the message names the file and the problem."""


def run_command(action: Callable[[], object], threads: int | None) -> None:
    """Run a views command: logging, intra-op threads, a ``ViewsError`` as one log line and exit 1."""
    setup_logging()
    set_threads(threads)
    try:
        action()
    except ViewsError as err:
        LOG.error("%s", err)
        sys.exit(1)


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
    return img[..., ::-1].copy()


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
