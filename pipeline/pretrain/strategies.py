"""Training-sample strategies: how one pretraining sample (target + N anchors) is drawn.

A strategy turns a source item (a bag of views, an image, a video) into a float tensor
``(1 + N, 3, S, S)``, ImageNet-normalized, **index 0 = target**, 1..N = anchors — the layout
``pipeline.pretrain.models_mae.CrossViewMAE.forward`` expects.

Registry (``STRATEGIES``, method name -> dataset builder; ``build_dataset`` dispatches on ``cell["method"]``):

- ``cdgmae``: bag of views (real image + M generated views). Target rule ``real``, ``generated``,
  ``either`` (uniform over the M + 1 images) or ``knn`` (target = the real image, anchors = real
  images of its k-NN); N distinct anchors from the rest. BYOL-style random resized crop, scale
  [0.5, 1], aspect (3/4, 4/3), flips; one crop box and flip shared by all views (SiamMAE-style,
  the default) or one per view (``pretrain.crop.shared: false``).
- ``cropmae``: CropMAE's GlobalToLocal — a global RRC of the real image, a local RRC *of the
  resized global crop*, each with its own flip; [global, local] = [anchor, target].
- ``siammae``: two frames of a video ``gap ~ randint(4, 48)`` apart (clipped to the video), same
  crop box and flip; past frame = anchor, future frame = target.

Determinism: every random choice of a sample comes from ``numpy.random.default_rng([seed, epoch,
index])``, so a sample depends only on (seed, epoch, index) — not on worker count, batch position
or whether the run was resumed. Datasets take ``(epoch, index)`` keys (see ``EpochSampler`` in
``pipeline.pretrain.engine``) so persistent workers need no epoch broadcast. The crop and
flip geometry is ``pipeline.pretrain.augment``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.consistency.knn_file import read_knn
from pipeline.crop_sampler import random_resized_crop_box
from pipeline.data.readers import list_imagenet, list_videos, read_rgb
from pipeline.imaging import ImageRejects, TooManyRejectsError
from pipeline.io import cached_sha256
from pipeline.pretrain.augment import match_size, normalize, resized_crop, to_chw
from pipeline.registry import Registry
from pipeline.views.bag import BagDataset

# ---------------------------------------------------------------------------------------------
# target / anchor choice in a bag of views


TARGET_RULES = ("real", "generated", "either", "real_or_generated", "knn")


def choose_bag_indices(rng: np.random.Generator, n_views: int, anchors: int, target: str) -> tuple[int, list[int]]:
    """Pick (target, anchors) among the bag images 0 = real, 1..M = generated views.

    ``real``: target 0; ``generated``: target uniform over 1..M; ``either``: uniform over 0..M
    (the paper's "one image is randomly chosen", so P(real) = 1/(M+1)); ``real_or_generated``: a
    fair coin between the real image and a generated view (P(real) = 1/2, the other reading of the
    paper's "random choice between real and generated"). Anchors: ``anchors``
    distinct images among the remaining M (real included when the target is generated).
    ``knn`` draws anchors from neighbours instead (see ``BagViewsDataset``), so it is not handled
    here.
    """
    if target == "real":
        t = 0
    elif target == "generated":
        t = int(rng.integers(1, n_views + 1))
    elif target == "either":
        t = int(rng.integers(0, n_views + 1))
    elif target == "real_or_generated":
        t = 0 if rng.random() < 0.5 else int(rng.integers(1, n_views + 1))
    else:
        raise ValueError(f"target rule {target!r} is not a bag rule (expected real/generated/either/real_or_generated)")
    rest = [i for i in range(n_views + 1) if i != t]
    if anchors > len(rest):
        raise ValueError(f"{anchors} anchors requested but the bag has only {len(rest)} other images")
    picked = rng.choice(len(rest), size=anchors, replace=False)
    return t, [rest[int(i)] for i in picked]


# ---------------------------------------------------------------------------------------------
# datasets

MAX_SUBSTITUTE_DRAWS = 64  # replacement draws for an unreadable image before giving up
T = TypeVar("T")


def load_or_redraw(load: Callable[[int], T | None], index: int, rng: np.random.Generator, n_items: int, what: str) -> T:
    """``load(index)``; while it comes back ``None`` (unreadable: ``ImageRejects`` has listed it), ``load``
    of another index drawn from the sample's own ``rng``, so samples stay a function of (seed, epoch,
    index) and of the set of bad files. ``MAX_SUBSTITUTE_DRAWS`` misses in a row are an error."""
    for _ in range(MAX_SUBSTITUTE_DRAWS):
        loaded = load(index)
        if loaded is not None:
            return loaded
        index = int(rng.integers(n_items))
    raise TooManyRejectsError(f"{what}: {MAX_SUBSTITUTE_DRAWS} draws in a row hit unreadable files")


class EpochDataset(Dataset):
    """Base: items are keyed by ``(epoch, index)`` (a plain int means epoch 0); every random
    draw of an item comes from ``rng(epoch, index)``."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), int(index)])

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {len(self)}")
        return self.sample(int(index), self.rng(epoch, index))

    def sample(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        raise NotImplementedError

    def source_files(self) -> list:
        """Files whose identity stands for the data (for ``signature``); none for in-memory data."""
        return []

    def signature(self, digest_cache: str | os.PathLike) -> list:
        """The dataset length and the content digests of ``source_files()``: a resumable training
        state made from other data (a regenerated bag, a new neighbours file) must not be continued,
        while a byte-identical rebuild, a moved project or a new mtime changes nothing. Digests are
        cached in ``digest_cache`` while a file's size and mtime stay the same."""
        return [len(self), *cached_sha256(self.source_files(), digest_cache)]


def _spread(items: Sequence) -> list:
    """First, middle and last items: a cheap stand-in for a whole file list in ``signature``."""
    return [items[i] for i in sorted({0, len(items) // 2, len(items) - 1})] if len(items) else []


class BagViewsDataset(EpochDataset):
    """CDG-MAE samples from a bag of views (``pipeline.views.bag.BagDataset`` or any sequence of the
    same items: ``{"image_id", "index", "real": HxWx3 uint8, "views": [HxWx3 uint8] * M}``)."""

    def __init__(
        self,
        bag,
        *,
        img_size: int,
        anchors: int,
        target: str,
        seed: int,
        scale=(0.5, 1.0),
        ratio=(3 / 4, 4 / 3),
        shared: bool = True,
        flip: bool = True,
        knn: dict | None = None,
    ):
        super().__init__(seed)
        if target not in TARGET_RULES:
            raise ValueError(f"unknown target rule {target!r}; expected one of {TARGET_RULES}")
        if target == "knn" and knn is None:
            raise ValueError("target=knn needs the neighbours file (--knn results/consistency/knn.npz)")
        self.bag, self.img_size, self.anchors, self.target = bag, int(img_size), int(anchors), target
        self.scale, self.ratio, self.shared, self.flip = tuple(scale), tuple(ratio), bool(shared), bool(flip)
        self.knn = knn
        self._row_of_index: dict[int, int] | None = None
        if knn is not None and self.anchors > knn["neighbours"].shape[1]:
            raise ValueError(
                f"{self.anchors} anchors but the neighbours file holds only "
                f"k = {knn['neighbours'].shape[1]} neighbours per image"
            )

    def __len__(self) -> int:
        return len(self.bag)

    def source_files(self) -> list:
        files = [self.bag.path] if getattr(self.bag, "path", None) is not None else []
        return files + ([self.knn["path"]] if self.knn and self.knn.get("path") else [])

    def _bag_row(self, global_index: int) -> int:
        """Bag row of an image by its global index (the bag may hold a subset, e.g. max_images)."""
        if self._row_of_index is None:
            indices = getattr(self.bag, "indices", None)
            if indices is None and getattr(self.bag, "path", None) is not None:
                # an HDF5 bag: read the index column, no JPEG decoding
                with h5py.File(self.bag.path, "r") as f:
                    indices = f["index"][:]
            if indices is None:  # an in-memory bag
                indices = [self.bag[r]["index"] for r in range(len(self.bag))]
            self._row_of_index = {int(g): r for r, g in enumerate(indices)}
        try:
            return self._row_of_index[int(global_index)]
        except KeyError:
            raise KeyError(f"neighbour with global index {global_index} is not in the bag of views") from None

    def _reader(self, index: int) -> tuple[int, Callable[[list[int]], tuple[dict, list[np.ndarray]]]]:
        """(M, read) of bag row ``index``: ``read(images)`` gives the row's metadata and its images
        ``images`` (0 = real, 1..M = views). A ``BagDataset`` decodes only those; any other bag's
        item (or a ``BagDataset``'s with a ``transform``) is fetched once, whole."""
        if isinstance(self.bag, BagDataset) and self.bag.transform is None:
            return self.bag.n_views, lambda images: self.bag.read(index, images)
        item = self.bag[index]
        row = [item["real"], *item["views"]]
        return len(item["views"]), lambda images: (item, [row[k] for k in images])

    def _real_image(self, index: int) -> np.ndarray:
        return self._reader(index)[1]([0])[1][0]

    def _neighbour_images(self, item: dict, rng: np.random.Generator) -> list[np.ndarray]:
        row = self.knn["row_of_id"].get(item["image_id"])
        if row is None:
            raise KeyError(f"image {item['image_id']!r} has no row in the neighbours file")
        neigh = self.knn["neighbours"][row]
        if (neigh == item["index"]).any():
            raise ValueError(f"neighbours of {item['image_id']!r} include the image itself")
        picked = rng.choice(len(neigh), size=self.anchors, replace=False)
        return [self._real_image(self._bag_row(neigh[int(i)])) for i in picked]

    def select(self, index: int, rng: np.random.Generator) -> tuple[dict, list[np.ndarray]]:
        """Bag row ``index``'s metadata and its [target, anchor_1..anchor_N] images (HxWx3 uint8),
        decoding only those. The draws (and their order) do not depend on which images are read."""
        n_views, read = self._reader(index)
        if self.target == "knn":
            item, (real,) = read([0])
            return item, [real] + self._neighbour_images(item, rng)
        t, a = choose_bag_indices(rng, n_views, self.anchors, self.target)
        return read([t, *a])

    def sample(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        item, selected = self.select(index, rng)
        name = f"bag item {index} ({item.get('image_id', '?')})"
        images = match_size([to_chw(im, name) for im in selected])
        h, w = images[0].shape[-2:]
        crops = []
        for k, im in enumerate(images):
            if k == 0 or not self.shared:  # draw a box (and flip) for the target, or per view
                box = random_resized_crop_box(rng, h, w, self.scale, self.ratio)
                flip = self.flip and bool(rng.random() < 0.5)
            crops.append(resized_crop(im, box, self.img_size, flip))
        return normalize(torch.stack(crops))  # (1 + N, 3, S, S)


class ImageListDataset(EpochDataset):
    """One image of a list (``ImageRecord``s with ``.path``) per sample, read under the bad-image
    policy: an image that does not decode is listed (``ImageRejects``, ``what`` names the images in
    its messages) and replaced by another drawn from the sample's own ``rng`` (``load_or_redraw``)."""

    def __init__(
        self,
        images: Sequence,
        *,
        seed: int,
        what: str,
        max_reject_fraction: float | None = None,
        rejects_listing: str | os.PathLike | None = None,
    ):
        super().__init__(seed)
        self.images = list(images)
        # shared: loader workers journal their rejects beside the listing, the fraction is the job's
        self.rejects = ImageRejects(len(self.images), max_reject_fraction, what, rejects_listing, shared=True)

    def __len__(self) -> int:
        return len(self.images)

    def source_files(self) -> list:
        return [r.path for r in _spread(self.images)]

    def _read(self, index: int) -> torch.Tensor | None:
        record = self.images[index]
        image_id = getattr(record, "image_id", record.path)  # records need only ``.path``
        image = self.rejects.load(index, image_id, record.path, read_rgb)
        return None if image is None else to_chw(image, str(record.path))

    def image(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """Image ``index`` (3, H, W) uint8, or the readable substitute ``rng`` draws for it."""
        return load_or_redraw(self._read, index, rng, len(self.images), self.rejects.what)


class GlobalToLocalDataset(ImageListDataset):
    """CropMAE GlobalToLocal samples from single images (``ImageRecord``s with ``.path``)."""

    def __init__(
        self,
        images: Sequence,
        *,
        img_size: int,
        seed: int,
        global_scale=(0.1, 1.0),
        local_scale=(0.3, 0.6),
        ratio=(3 / 4, 4 / 3),
        flip: bool = True,
        max_reject_fraction: float | None = None,
        rejects_listing: str | os.PathLike | None = None,
    ):
        super().__init__(
            images,
            seed=seed,
            what="CropMAE images",
            max_reject_fraction=max_reject_fraction,
            rejects_listing=rejects_listing,
        )
        self.img_size = int(img_size)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio, self.flip = tuple(ratio), bool(flip)

    def crops(self, image: torch.Tensor, rng: np.random.Generator):
        """(global box on the image, local box on the resized global crop) and the two crops."""
        s = self.img_size
        gbox = random_resized_crop_box(rng, *image.shape[-2:], self.global_scale, self.ratio)
        global_crop = resized_crop(image, gbox, s, False)  # (3, S, S)
        lbox = random_resized_crop_box(rng, s, s, self.local_scale, self.ratio)
        local_crop = resized_crop(global_crop, lbox, s, False)
        # each view gets its own flip, after both crops (as the reference's per-view transforms)
        if self.flip and rng.random() < 0.5:
            global_crop = global_crop.flip(-1)
        if self.flip and rng.random() < 0.5:
            local_crop = local_crop.flip(-1)
        return gbox, lbox, global_crop, local_crop

    def sample(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        image = self.image(index, rng)
        _, _, global_crop, local_crop = self.crops(image, rng)
        # reference order [global, local] = [anchor, target]; ours puts the target first
        return normalize(torch.stack([local_crop, global_crop]))  # (2, 3, S, S)


def sample_frame_pair(rng: np.random.Generator, n_frames: int, gap_range=(4, 48)) -> tuple[int, int]:
    """SiamMAE's ``sample_frames``: gap ~ randint(min(lo, n-1), min(hi, n)) (upper exclusive),
    f1 uniform in [0, n - gap - 1], f2 = f1 + gap."""
    if n_frames < 2:
        raise ValueError(f"a video needs at least 2 frames, got {n_frames}")
    lo, hi = min(int(gap_range[0]), n_frames - 1), min(int(gap_range[1]), n_frames)
    gap = int(rng.integers(lo, hi)) if hi > lo else lo
    f1 = int(rng.integers(0, n_frames - gap))
    return f1, f1 + gap


class VideoPairDataset(EpochDataset):
    """SiamMAE samples: two frames of one video (``VideoRecord``s with ``.name``, ``.frames``)."""

    def __init__(
        self,
        videos: Sequence,
        *,
        img_size: int,
        seed: int,
        frame_gap=(4, 48),
        scale=(0.5, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip: bool = True,
        max_reject_fraction: float | None = None,
        rejects_listing: str | os.PathLike | None = None,
    ):
        super().__init__(seed)
        self.videos, self.img_size = list(videos), int(img_size)
        self.frame_gap, self.scale, self.ratio, self.flip = tuple(frame_gap), tuple(scale), tuple(ratio), bool(flip)
        n_frames = sum(len(v.frames) for v in self.videos)
        self.rejects = ImageRejects(n_frames, max_reject_fraction, "SiamMAE frames", rejects_listing, shared=True)

    def __len__(self) -> int:
        return len(self.videos)

    def source_files(self) -> list:
        return [f for v in _spread(self.videos) for f in _spread(v.frames)]

    def frame_pair(self, index: int, rng: np.random.Generator) -> list[torch.Tensor]:
        """[past, future] frames of video ``index``; a pair with an unreadable frame (``ImageRejects``)
        is redrawn from the sample's own ``rng`` (another pair of another video)."""

        def read_pair(index: int) -> list[torch.Tensor] | None:
            video = self.videos[index]
            pair = [video.frames[f] for f in sample_frame_pair(rng, len(video.frames), self.frame_gap)]
            frames = [self.rejects.load(str(f), f"{video.name}/{f.stem}", f, read_rgb) for f in pair]
            if any(frame is None for frame in frames):
                return None
            return [to_chw(frame, str(f)) for frame, f in zip(frames, pair)]

        return load_or_redraw(read_pair, index, rng, len(self.videos), self.rejects.what)

    def sample(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        past, future = match_size(self.frame_pair(index, rng))
        box = random_resized_crop_box(rng, *future.shape[-2:], self.scale, self.ratio)
        flip = self.flip and bool(rng.random() < 0.5)
        # target = future frame, anchor = past frame, one box and flip for both
        return normalize(
            torch.stack([resized_crop(future, box, self.img_size, flip), resized_crop(past, box, self.img_size, flip)])
        )


# ---------------------------------------------------------------------------------------------
# registry entries: (cell, settings, sources) -> dataset

# method name -> builder(cell, settings, *, seed, **sources) -> EpochDataset
STRATEGIES = Registry("method")


def knn_table(knn_path: str | Path, imagenet_root: str | Path) -> dict:
    """The consistency stage's neighbours (rows = global indices of ``list_imagenet(root)``),
    checked against the current image list, keyed by image id."""
    ids = [r.image_id for r in list_imagenet(imagenet_root)]
    neighbours = np.asarray(read_knn(knn_path, ids), dtype=np.int64)
    return {"row_of_id": {i: r for r, i in enumerate(ids)}, "neighbours": neighbours, "path": str(knn_path)}


def _records(given, root, lister: Callable[..., list], flag: str, method: str) -> list:
    """Records passed in, or listed from a dataset root by ``lister`` (``pipeline.data.readers``)."""
    if given is not None:
        return list(given)
    if root is None:
        raise ValueError(f"method {method} needs {flag}")
    return lister(root)


@STRATEGIES.register("cdgmae")
def build_cdgmae(
    cell: dict, settings: dict, *, seed: int, bag=None, knn=None, imagenet_root=None, **_
) -> BagViewsDataset:
    if bag is None:
        raise ValueError("method cdgmae needs a bag of views (--bag results/views/<generator>/bag.h5)")
    if isinstance(bag, (str, Path)):
        if not Path(bag).exists():
            raise FileNotFoundError(f"bag of views not found: {bag}")
        bag = BagDataset(str(bag))
    if cell["target"] == "knn":
        if knn is None or (isinstance(knn, (str, Path)) and imagenet_root is None):
            raise ValueError(
                "target=knn needs --knn results/consistency/knn.npz and --imagenet-root (the image list its rows index)"
            )
        knn = knn_table(knn, imagenet_root) if isinstance(knn, (str, Path)) else knn
    else:
        knn = None
    crop = settings["crop"]
    return BagViewsDataset(
        bag,
        img_size=settings["img_size"],
        anchors=cell["anchors"],
        target=cell["target"],
        seed=seed,
        scale=crop["scale"],
        ratio=crop["ratio"],
        shared=crop["shared"],
        flip=crop["flip"],
        knn=knn,
    )


def image_list_builder(make: Callable[..., ImageListDataset]) -> Callable[..., ImageListDataset]:
    """The registry builder ``(cell, settings, *, seed, **sources)`` of a dataset over the images of
    the ImageNet-layout root: ``make(images, cell, settings, seed=, max_reject_fraction=,
    rejects_listing=)`` with the records passed in (``images``) or listed from ``--imagenet-root``."""

    def build(
        cell: dict,
        settings: dict,
        *,
        seed: int,
        imagenet_root=None,
        images=None,
        max_reject_fraction: float | None = None,
        rejects_listing=None,
        **_,
    ) -> ImageListDataset:
        images = _records(images, imagenet_root, list_imagenet, "--imagenet-root", cell["method"])
        reader = {"seed": seed, "max_reject_fraction": max_reject_fraction, "rejects_listing": rejects_listing}
        return make(images, cell, settings, **reader)

    return build


@STRATEGIES.register("cropmae")
@image_list_builder
def build_cropmae(images: list, cell: dict, settings: dict, **reader) -> GlobalToLocalDataset:
    cfg = settings["cropmae"]
    return GlobalToLocalDataset(
        images,
        img_size=settings["img_size"],
        global_scale=cfg["global_scale"],
        local_scale=cfg["local_scale"],
        ratio=settings["crop"]["ratio"],
        flip=settings["crop"]["flip"],
        **reader,
    )


@STRATEGIES.register("siammae")
def build_siammae(
    cell: dict,
    settings: dict,
    *,
    seed: int,
    videos_root=None,
    videos=None,
    max_reject_fraction: float | None = None,
    rejects_listing=None,
    **_,
):
    videos = _records(videos, videos_root, list_videos, "--videos-root", "siammae")
    short = [v.name for v in videos if len(v.frames) < 2]
    if short:
        raise ValueError(f"videos with fewer than 2 frames: {short[:5]}")
    crop = settings["crop"]
    return VideoPairDataset(
        videos,
        img_size=settings["img_size"],
        seed=seed,
        frame_gap=settings["siammae"]["frame_gap"],
        scale=crop["scale"],
        ratio=crop["ratio"],
        flip=crop["flip"],
        max_reject_fraction=max_reject_fraction,
        rejects_listing=rejects_listing,
    )


def build_dataset(cell: dict, settings: dict, *, seed: int, **sources) -> EpochDataset:
    """The training dataset of a cell: ``STRATEGIES[cell["method"]]`` with the sources it needs
    (``bag``, ``knn``, ``imagenet_root``/``images``, ``videos_root``/``videos``)."""
    method = cell["method"]
    if method not in STRATEGIES:
        raise KeyError(f"unknown method {method!r}; registered: {sorted(STRATEGIES)}")
    return STRATEGIES[method](cell, settings, seed=seed, **sources)


# the single-image MAE-family methods (mae, lut, pseudo-mae) register themselves here too, so the
# registry is complete whichever module is imported first
from pipeline.pretrain import mae_family_data as _mae_family_data  # noqa: E402, F401
