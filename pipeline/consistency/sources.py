"""Image sources of the consistency pairs (key -> HxWx3 uint8) and batched feature (and colour)
extraction.

Every source has ``load(key, size)`` and ``describe(key)`` (the file, for error messages). Real
images go through ``pipeline.imaging.load_square`` (short side to ``size`` + centre crop): the same
preprocessing as the bag's real images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.consistency.pair_metrics import mean_lab_colours
from pipeline.imaging import ImageRejects, load_square, resize_square, try_load
from pipeline.runtime import progress
from pipeline.views.bag import BagDataset


class ImageListSource:
    """Pretraining images (``list_imagenet`` order = global index); key = global index."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def image_id(self, index: int) -> str:
        return self.records[index].image_id

    def load(self, index: int, size: int) -> np.ndarray:
        return load_square(self.records[index].path, size)

    def describe(self, index: int) -> str:
        return str(self.records[index].path)


class VideoFrameSource:
    """Frame-folder videos; key = (video position, frame position)."""

    def __init__(self, videos):
        self.videos = videos

    def load(self, key, size: int) -> np.ndarray:
        v, t = key
        return load_square(self.videos[v].frames[t], size)

    def describe(self, key) -> str:
        v, t = key
        return str(self.videos[v].frames[t])


class BagSource:
    """A merged bag of views; key = (bag position, view) with view -1 = the real image."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bag = BagDataset(str(self.path))  # checks presence, completeness, VDS sources
        with h5py.File(self.path, "r") as f:  # ids only: no JPEG decoding (pipeline.views.hdf5 layout)
            self.image_ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f["image_id"][:]]
            # what made the views (each part's generator description): the rows' label and sampler columns
            self.samplers = json.loads(f.attrs.get("samplers", "[]"))
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
    """torch Dataset over source keys -> ((S, S, 3) uint8 tensor, reason), decoded in the workers;
    an image that does not decode comes back as zeros with the reason (``try_load``), so the
    caller applies the bad-image policy in one process."""

    def __init__(self, source, keys: Sequence, size: int):
        self.source, self.keys, self.size = source, list(keys), size

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        image, reason = try_load(self.source.load, key, self.size)
        if image is None:
            return torch.zeros((self.size, self.size, 3), dtype=torch.uint8), reason
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"{self.source.describe(key)}: expected a {self.size}x{self.size}x3 uint8 "
                f"image, got {image.shape} {image.dtype}"
            )
        return torch.from_numpy(np.ascontiguousarray(image)), ""


def _record_bad(source, keys: Sequence, reasons: Sequence[str], rejects: ImageRejects | None) -> list[int]:
    """Positions of the batch's unreadable images, recorded in ``rejects``; without a policy the
    first one is an error naming the file."""
    bad = [j for j, reason in enumerate(reasons) if reason]
    for j in bad:
        if rejects is None:
            raise RuntimeError(f"cannot read image {source.describe(keys[j])}: {reasons[j]}")
        image_id = source.image_id(keys[j]) if hasattr(source, "image_id") else ""
        rejects.add(keys[j], image_id, source.describe(keys[j]), reasons[j])
    return bad


def iter_image_batches(
    source,
    keys: Sequence,
    size: int,
    batch_size: int,
    num_workers: int = 0,
    desc: str = "images",
    rejects: ImageRejects | None = None,
):
    """Yield (start, (B, S, S, 3) uint8 tensor, positions of the batch's unreadable images) for
    consecutive batches of ``keys``, decoded in ``num_workers`` workers. Unreadable images: with
    ``rejects`` (the bad-image policy) they are listed and come as zeros; without, the first one is
    an error naming the file."""
    loader = torch.utils.data.DataLoader(
        _KeyedImages(source, keys, size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
    )
    start = 0
    for images, reasons in progress(loader, desc=desc, total=len(loader), unit="batch"):
        yield start, images, _record_bad(source, keys[start : start + len(images)], reasons, rejects)
        start += len(images)


def _encode_batch(encoder, source, keys: Sequence, images, bad: list[int], keep_patches: bool):
    """TokenFeatures on CPU of one batch; the rows of unreadable images (``bad``) are NaN."""
    feats = encoder.encode(images)
    finite = torch.isfinite(feats.patch_tokens).all(dim=(1, 2)) & torch.isfinite(feats.global_tokens).all(1)
    finite[bad] = True  # replaced below
    if not finite.all():
        which = [source.describe(keys[int(i)]) for i in (~finite).nonzero().flatten()[:5].tolist()]
        raise FloatingPointError(f"non-finite features for {which}")
    feats.global_tokens = feats.global_tokens.cpu()
    feats.patch_tokens = feats.patch_tokens.cpu() if keep_patches else None
    if bad:  # a skipped image has no features: NaN marks its row
        feats.global_tokens[bad] = float("nan")
        if feats.patch_tokens is not None:
            feats.patch_tokens[bad] = float("nan")
    return feats


def iter_feature_batches(
    encoder,
    source,
    keys: Sequence,
    batch_size: int,
    num_workers: int = 0,
    desc: str = "features",
    keep_patches: bool = True,
    rejects: ImageRejects | None = None,
):
    """Yield (start, TokenFeatures on CPU) for consecutive batches of ``keys``, in order
    (``keep_patches=False``: patch tokens are dropped on the device, only globals come back).

    Unreadable images: with ``rejects`` (the bad-image policy) they are skipped and listed and
    their features are NaN rows; without, the first one is an error naming the file."""
    batches = iter_image_batches(source, keys, encoder.image_size, batch_size, num_workers, desc, rejects)
    for start, images, bad in batches:
        yield start, _encode_batch(encoder, source, keys[start : start + len(images)], images, bad, keep_patches)


def extract_features_and_colours(
    encoder, source, keys: Sequence, batch_size: int, num_workers: int = 0, desc: str = "features"
):
    """Features and mean CIELAB colours of every key, each image decoded once: (global (N, C),
    patches (N, L, C)) on CPU, float32, and colours (N, 3) (``pair_metrics.mean_lab_colours`` of
    the image the encoder saw). An unreadable image is an error naming the file."""
    glob, patches, colours = [], [], []
    for start, images, _ in iter_image_batches(source, keys, encoder.image_size, batch_size, num_workers, desc):
        feats = _encode_batch(encoder, source, keys[start : start + len(images)], images, [], True)
        glob.append(feats.global_tokens)
        patches.append(feats.patch_tokens)
        colours.append(mean_lab_colours(images.numpy()))
    return torch.cat(glob), torch.cat(patches), np.concatenate(colours)
