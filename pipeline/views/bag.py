"""The training reader of a bag of views: ``BagDataset`` over a shard or a merged ``bag.h5``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from pipeline.views.hdf5 import ViewsError, decode_jpeg, verify_view_file


class BagDataset:
    """Bags of views from a shard or merged ``bag.h5`` (torch ``Dataset`` protocol).

    Item: ``{"image_id": str, "index": int, "real": (H, W, 3) uint8, "views": [M x (H, W, 3) uint8]}``,
    passed through ``transform(item)`` when given; ``read(i, images)`` decodes only some of a
    row's images (a training sample uses 1 + N of the M + 1). ``__init__`` checks the layout and
    the recorded content digest (``verify_view_file``: ``pipeline.io.IntegrityError`` on a
    mismatch). The HDF5 file is opened lazily, once per process (DataLoader worker), never in
    ``__init__``: h5py handles must not cross a fork or be pickled.
    """

    def __init__(self, path: str | os.PathLike, transform=None):
        self.path = Path(path)
        self.transform = transform
        if not self.path.exists():
            raise FileNotFoundError(f"bag of views not found: {self.path}")
        try:
            f = h5py.File(self.path, "r")
        except OSError as err:  # truncated, zero-byte or not HDF5: h5py's message lacks the path
            raise ViewsError(f"{self.path}: not a readable bag of views (truncated or corrupt HDF5): {err}") from None
        with f:
            self._validate(f)
            a = f.attrs
            self._len = len(f["index"])
            self.generator = str(a["generator"])
            self.is_baseline = bool(a["is_baseline"])
            self.n_views = int(a["n_views"])
            self.settings = json.loads(a["settings"])
        # the content digest last, after the cheap structural checks (whose messages are clearer):
        # once, here in the main process; DataLoader workers get the checked dataset pickled
        verify_view_file(self.path)
        self._file = None
        self._pid = None
        self._datasets: dict = {}

    def _validate(self, f) -> None:
        """Complete, the expected row count, and every virtual source present."""
        a = f.attrs
        if not a.get("complete", False):
            raise ViewsError(f"{self.path} is incomplete (attribute complete is not set)")
        n = len(f["index"])
        if n != int(a["expected_rows"]):
            raise ViewsError(f"{self.path}: {n} rows != expected_rows {a['expected_rows']}")
        for key in ("real", "views"):  # a VDS reads missing sources as fill values
            ds = f[key]
            if ds.is_virtual:
                for vs in ds.virtual_sources():
                    src = self.path.parent / vs.file_name
                    if not src.exists():
                        raise ViewsError(f"{self.path}: virtual source {src} is missing")
        if f["views"].ndim != 2 or f["views"].shape[1] != int(a["n_views"]):  # read() indexes views by n_views
            raise ViewsError(
                f"{self.path}: views dataset of shape {f['views'].shape} != (rows, n_views={a['n_views']})"
            )

    def __len__(self) -> int:
        return self._len

    def _h5(self) -> dict:
        """This process's row datasets (looked up once: a lookup costs as much as a row read)."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self._datasets = {key: self._file[key] for key in ("image_id", "index", "real", "views")}
        return self._datasets

    def _row(self, i: int) -> int:
        if not -self._len <= i < self._len:
            raise IndexError(f"bag index {i} out of range [0, {self._len})")
        return int(i) % self._len

    def read(self, i: int, images: Sequence[int]) -> tuple[dict, list[np.ndarray]]:
        """Row ``i``'s ``{"image_id", "index"}`` and only the bag images ``images`` (0 = the real
        image, 1..M = the generated views), decoded in that order: a training sample that uses
        2 or 4 of the 5 images decodes only those. No ``transform`` is applied."""
        i = self._row(i)
        wanted = [int(k) for k in images]
        bad = [k for k in wanted if not 0 <= k <= self.n_views]
        if bad:
            raise IndexError(f"{self.path}: bag images {bad} out of range [0, {self.n_views}] (0 = real)")
        f = self._h5()
        image_id = f["image_id"][i]
        meta = {
            "image_id": image_id.decode() if isinstance(image_id, bytes) else str(image_id),
            "index": int(f["index"][i]),
        }
        views = f["views"][i] if any(k > 0 for k in wanted) else None  # one chunk read for the row's M blobs
        blobs = [f["real"][i] if k == 0 else views[k - 1] for k in wanted]
        decoded = []
        for k, blob in zip(wanted, blobs):
            try:
                decoded.append(decode_jpeg(blob))
            except ValueError as err:  # a blob that does not decode, under a valid digest
                what = "the real image" if k == 0 else f"view {k - 1}"
                raise ViewsError(
                    f"{self.path}: row {i} (image {meta['image_id']!r}, index {meta['index']}): {what} "
                    f"does not decode ({err}); the bag's generator wrote a bad blob: regenerate the bag"
                ) from None
        return meta, decoded

    def __getitem__(self, i: int) -> dict:
        meta, (real, *views) = self.read(i, range(self.n_views + 1))
        item = {**meta, "real": real, "views": views}
        return self.transform(item) if self.transform is not None else item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        state["_datasets"] = {}
        return state

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._datasets = {}
