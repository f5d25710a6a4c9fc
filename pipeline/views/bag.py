"""The training reader of a bag of views: ``BagDataset`` over a shard or a merged ``bag.h5``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

from pipeline.views.hdf5 import ViewsError, decode_jpeg


class BagDataset:
    """Bags of views from a shard or merged ``bag.h5`` (torch ``Dataset`` protocol).

    Item: ``{"image_id": str, "index": int, "real": (H, W, 3) uint8, "views": [M x (H, W, 3) uint8]}``,
    passed through ``transform(item)`` when given. The HDF5 file is opened lazily, once per
    process (DataLoader worker), never in ``__init__``: h5py handles must not cross a fork or be
    pickled.
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
        self._file = None
        self._pid = None

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

    def __len__(self) -> int:
        return self._len

    def _h5(self):
        if self._file is None or self._pid != os.getpid():
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
