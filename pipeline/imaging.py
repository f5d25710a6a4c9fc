"""Image helpers shared by the stages: one definition of each preprocessing step, and the one
policy for images that do not decode (``ImageRejects``)."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline.config import section_defaults
from pipeline.io import write_csv_atomic

LOG = logging.getLogger("cdgmae.imaging")


def load_square(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read an image as RGB, resize the short side to ``size`` and centre-crop: (size, size, 3) uint8.

    The preprocessing of the bag's real images and of the consistency scores' image sources.
    Raises OSError/ValueError (with the file name) for an unreadable or corrupt image.
    """
    with Image.open(path) as im:
        im.load()  # decode fully now: truncated/corrupt JPEGs fail here, not later
        if im.width < 1 or im.height < 1:
            raise ValueError(f"{path}: empty image")
        im = im.convert("RGB")
        im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, C) image to (size, size); area interpolation when shrinking."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def pil_nearest(ids: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """PIL nearest resize of an id map to (H, W) (how DAVIS_480_880 and the VIP scorer resize)."""
    if ids.shape == tuple(hw):
        return ids
    return np.array(Image.fromarray(ids).resize((int(hw[1]), int(hw[0])), Image.NEAREST))


# ---------------------------------------------------------------------------------------------
# bad images: one policy for every reader of an image root

REJECT_COLUMNS = ("index", "image_id", "path", "reason")  # the listing's columns (views' rejects.csv too)


class TooManyRejectsError(RuntimeError):
    """More images of a root failed to decode than the allowed fraction; the message names the listing."""


def try_load(loader: Callable[..., np.ndarray], path: str | os.PathLike, *args) -> tuple[np.ndarray | None, str]:
    """``(loader(path, *args), "")``, or ``(None, reason)`` when the image cannot be decoded (missing,
    zero bytes, corrupt): decoders raise OSError, ValueError, SyntaxError, cv2.error and more."""
    try:
        return loader(path, *args), ""
    except Exception as err:  # whatever the decoder raised is the logged reason
        return None, f"{type(err).__name__}: {err}"


class ImageRejects:
    """The bad-image policy of every reader of an image root (view generation, CropMAE pretraining,
    the k-NN step): an image that does not decode is skipped with a logged warning naming it and the
    reason, and listed; more than ``max_fraction`` (default: the schema's ``views.max_reject_fraction``)
    of the ``total`` images rejected is an error
    (``TooManyRejectsError``) naming the listing, which is written (atomically) before it is raised.

    ``shared``: several processes read the root for one job (DataLoader workers, DDP ranks on one
    file system), each with its own copy of this object. Each then also appends its rejects to a
    file of its own in the journal folder ``<listing>.d/``, and the fraction counts every
    process's rejects, deduplicated: the job's, not one worker's. ``write_listing`` (the main
    process, at each epoch end and at the end) writes the job's listing whenever it is non-empty.
    """

    def __init__(
        self,
        total: int,
        max_fraction: float | None,
        what: str,
        listing: str | os.PathLike | None = None,
        shared: bool = False,
    ):
        if max_fraction is None:  # the configured default of the views stage, which set the policy
            max_fraction = section_defaults("views")["max_reject_fraction"]
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {max_fraction}")
        self.total, self.max_fraction, self.what = int(total), float(max_fraction), what
        self.listing = Path(listing) if listing is not None else None
        self.journal = self.listing.with_name(self.listing.name + ".d") if shared and self.listing else None
        self.rows: dict = {}  # key -> (key, image_id, path, reason); once per image

    def __len__(self) -> int:
        return len(self.all_rows())

    def all_rows(self) -> dict:
        """This process's rejects and, when ``shared``, every other process's of the job (journal)."""
        if self.journal is None or not self.journal.is_dir():
            return dict(self.rows)
        rows = {}
        for part in sorted(self.journal.glob("*.csv")):
            try:
                with open(part, newline="") as fh:
                    for fields in csv.reader(fh):
                        if len(fields) == len(REJECT_COLUMNS):  # a line cut by a kill is skipped
                            key = int(fields[0]) if fields[0].lstrip("-").isdigit() else fields[0]
                            rows.setdefault(key, (key, *fields[1:]))
            except OSError:  # removed by a reset meanwhile
                continue
        for key, row in self.rows.items():
            rows.setdefault(key, row)
        return rows

    def _journal(self, row: tuple) -> None:
        """Append ``row`` to this process's journal file (one ``write`` per line, then closed)."""
        self.journal.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname().replace('.', '-')}-{os.getpid()}.csv"
        line = io.StringIO()
        csv.writer(line).writerow(row)
        with open(self.journal / name, "a", newline="") as fh:
            fh.write(line.getvalue())

    def reset(self) -> None:
        """Forget the job's journal and listing (a job starting over; the main process, before any
        worker)."""
        if self.journal is not None:
            shutil.rmtree(self.journal, ignore_errors=True)
        if self.listing is not None:
            self.listing.unlink(missing_ok=True)

    def write_listing(self) -> int:
        """Write the job's listing (``listing``) when any image was rejected; the number listed."""
        rows = self.all_rows()
        if rows and self.listing is not None:
            self._write(rows, self.listing)
        return len(rows)

    def add(self, index, image_id: str, path, reason: str) -> None:
        """Record (once) that image ``index`` (a global index, or a reader's key) was skipped, then
        enforce the fraction."""
        if index in self.rows:
            return
        LOG.warning("%s: skipping unreadable image %s (%s)", self.what, path, reason)
        self.rows[index] = (index, str(image_id), str(path), str(reason))
        if self.journal is not None:
            self._journal(self.rows[index])
        self.check()

    def load(self, index, image_id: str, path, loader: Callable[..., np.ndarray], *args) -> np.ndarray | None:
        """``loader(path, *args)``, or None for a bad image (recorded by ``add``)."""
        image, reason = try_load(loader, path, *args)
        if image is None:
            self.add(index, image_id, path, reason)
        return image

    def check(self) -> None:
        """Raise ``TooManyRejectsError`` above the allowed fraction, after writing the listing."""
        rows = self.all_rows()
        if len(rows) <= self.max_fraction * self.total:
            return
        where = "the job log"
        if self.listing is not None:
            self._write(rows, self.listing)
            where += f" and in {self.listing}"
        first = "; ".join(f"{path} ({reason})" for _, _, path, reason in list(rows.values())[:3])
        raise TooManyRejectsError(
            f"{self.what}: {len(rows)} of {self.total} images are unreadable, above "
            f"max_reject_fraction = {self.max_fraction}; they are listed in {where}, e.g. {first}"
        )

    def write(self, path: str | os.PathLike) -> None:
        """The listing as CSV (``REJECT_COLUMNS``, by index), written atomically."""
        self._write(self.all_rows(), path)

    @staticmethod
    def _write(rows: dict, path: str | os.PathLike) -> None:
        ordered = sorted(rows.values(), key=lambda row: (isinstance(row[0], str), row[0]))
        write_csv_atomic(pd.DataFrame(ordered, columns=list(REJECT_COLUMNS)), path)
