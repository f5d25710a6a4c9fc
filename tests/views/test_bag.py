"""``BagDataset``: selective decoding (a training sample decodes only the images it uses), samples
identical to the decode-all path, layout checks."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import pipeline.views.bag as bag_module
from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.crop_sampler import random_resized_crop_box
from pipeline.io import IntegrityError, digest_path, record_digest
from pipeline.pretrain.augment import match_size, normalize, resized_crop, to_chw
from pipeline.pretrain.strategies import BagViewsDataset, choose_bag_indices
from pipeline.views.bag import BagDataset
from pipeline.views.hdf5 import ViewsError, encode_jpeg, write_rows

M = 4
ROWS = 6


def write_tiny_bag(path, rows=ROWS, n_views=M, n_views_attr=None, seed=0):
    """A merged bag in the views stage's layout; the real images are 40 px, the views 32 px (as
    a generator's output size may differ from the source's), so ``match_size`` is exercised."""
    rng = np.random.default_rng(seed)
    real = [encode_jpeg(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), 95) for _ in range(rows)]
    views = [
        [encode_jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), 95) for _ in range(n_views)]
        for _ in range(rows)
    ]
    with h5py.File(path, "w") as f:
        write_rows(
            f, real, views, [f"c/{i:03d}" for i in range(rows)], list(range(rows)), [[0] * n_views] * rows, n_views
        )
        f.attrs.update(
            complete=True,
            expected_rows=rows,
            generator="warp",
            is_baseline=True,
            n_views=n_views if n_views_attr is None else n_views_attr,
            settings=json.dumps({}),
        )
    record_digest(path)
    return path


@pytest.fixture
def bag_path(tmp_path):
    return write_tiny_bag(tmp_path / "bag.h5")


@pytest.fixture
def decodes(monkeypatch):
    """Counts the JPEG decodes ``BagDataset`` does."""
    calls = []
    real_decode = bag_module.decode_jpeg

    def counting(blob):
        calls.append(len(blob))
        return real_decode(blob)

    monkeypatch.setattr(bag_module, "decode_jpeg", counting)
    return calls


def decode_all_sample(ds: BagViewsDataset, bag: BagDataset, epoch: int, index: int) -> torch.Tensor:
    """The sample as built before selective decoding: decode the whole row, then draw target and
    anchors, then one box (and flip) for the target or per view. Pins the RNG order."""
    rng = ds.rng(epoch, index)
    item = bag[index]
    images = [item["real"], *item["views"]]
    t, anchors = choose_bag_indices(rng, len(item["views"]), ds.anchors, ds.target)
    chosen = match_size([to_chw(images[k]) for k in [t, *anchors]])
    h, w = chosen[0].shape[-2:]
    crops = []
    for k, im in enumerate(chosen):
        if k == 0 or not ds.shared:
            box = random_resized_crop_box(rng, h, w, ds.scale, ds.ratio)
            flip = ds.flip and bool(rng.random() < 0.5)
        crops.append(resized_crop(im, box, ds.img_size, flip))
    return normalize(torch.stack(crops))


def test_read_decodes_only_the_requested_images_in_order(bag_path, decodes):
    bag = BagDataset(bag_path)
    full = bag[2]
    decodes.clear()
    meta, images = bag.read(2, [3, 0])
    assert len(decodes) == 2
    assert meta == {"image_id": "c/002", "index": 2}
    assert np.array_equal(images[0], full["views"][2]) and np.array_equal(images[1], full["real"])
    with pytest.raises(IndexError, match=r"bag images \[5\] out of range \[0, 4\]"):
        bag.read(0, [5])
    with pytest.raises(IndexError, match="bag index 6 out of range"):
        bag.read(6, [0])


@pytest.mark.parametrize(
    ("anchors", "target", "shared"),
    [
        (1, "either", True),
        (3, "either", True),
        (3, "generated", False),
        (2, "real_or_generated", True),
        (1, "real", True),
    ],
)
def test_samples_are_those_of_the_decode_all_path(bag_path, decodes, anchors, target, shared):
    bag = BagDataset(bag_path)
    ds = BagViewsDataset(bag, img_size=24, anchors=anchors, target=target, seed=7, shared=shared)
    for epoch, index in [(0, 0), (0, 5), (1, 3), (4, 1)]:
        decodes.clear()
        got = ds[(epoch, index)]
        assert len(decodes) == 1 + anchors  # a1 decodes 2 of the 5 images, a3 4
        assert torch.equal(got, decode_all_sample(ds, bag, epoch, index))
    in_memory = BagViewsDataset(
        [bag[i] for i in range(ROWS)], img_size=24, anchors=anchors, target=target, seed=7, shared=shared
    )
    assert all(torch.equal(ds[(2, i)], in_memory[(2, i)]) for i in range(ROWS))


def test_knn_samples_decode_only_real_images(bag_path, decodes):
    neighbours = np.array([[(r + d) % ROWS for d in (1, 2, 3)] for r in range(ROWS)])
    knn = {"row_of_id": {f"c/{r:03d}": r for r in range(ROWS)}, "neighbours": neighbours}
    bag = BagDataset(bag_path)
    ds = BagViewsDataset(bag, img_size=24, anchors=2, target="knn", seed=1, knn=knn)
    in_memory = BagViewsDataset([bag[i] for i in range(ROWS)], img_size=24, anchors=2, target="knn", seed=1, knn=knn)
    decodes.clear()
    got = ds[(0, 4)]
    assert len(decodes) == 3  # the row's real image and two neighbours' real images
    assert torch.equal(got, in_memory[(0, 4)])


def test_views_dataset_disagreeing_with_n_views_is_an_error(tmp_path):
    path = write_tiny_bag(tmp_path / "bad.h5", n_views=3, n_views_attr=4)
    with pytest.raises(ViewsError, match=r"bad.h5: views dataset of shape \(6, 3\) != \(rows, n_views=4\)"):
        BagDataset(path)


@pytest.mark.fault
def test_a_bag_not_matching_its_recorded_digest_is_refused(bag_path):
    BagDataset(bag_path)  # as written: verifies
    with h5py.File(bag_path, "r+") as f:  # a changed image id: valid HDF5, wrong content
        f["image_id"][0] = "c/999"
    with pytest.raises(IntegrityError, match=r"bag.h5: content digest .* does not match"):
        BagDataset(bag_path)
    digest_path(bag_path).unlink()
    with pytest.raises(IntegrityError, match=r"bag.h5: no recorded content digest"):
        BagDataset(bag_path)


def test_normalize_is_the_imagenet_formula():
    views = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(normalize(views), (views.float() / 255.0 - mean) / std)


def test_a_bag_with_a_transform_is_read_whole_through_it(bag_path):
    def invert(item):
        return {**item, "real": 255 - item["real"], "views": [255 - v for v in item["views"]]}

    bag = BagDataset(bag_path, transform=invert)
    ds = BagViewsDataset(bag, img_size=24, anchors=3, target="either", seed=2)
    in_memory = BagViewsDataset([bag[i] for i in range(ROWS)], img_size=24, anchors=3, target="either", seed=2)
    assert all(torch.equal(ds[(0, i)], in_memory[(0, i)]) for i in range(ROWS))


def test_a_blob_that_does_not_decode_is_named_by_file_row_and_image(tmp_path):
    """A faulty generator's blob under a valid digest: the error names the bag, the row and the
    image id, not just "corrupt JPEG blob"."""
    path = write_tiny_bag(tmp_path / "bag.h5")
    with h5py.File(path, "r+") as f:
        f["views"][3, 1] = np.frombuffer(b"not a jpeg at all", np.uint8)
    record_digest(path)  # the digest is valid: the generator wrote these bytes
    bag = BagDataset(path)
    bag.read(3, [0, 1])  # the other images of the row decode
    with pytest.raises(ViewsError, match=rf"{path}: row 3 \(image 'c/003', index 3\): view 1 does not decode"):
        bag.read(3, [2])


def test_a_generator_writing_undecodable_blobs_never_makes_a_part(tmp_path, monkeypatch):
    """Blobs are decoded back before a part is written: a bad bag is never assembled."""
    import pipeline.views.generate as shards
    from pipeline.config import section_defaults
    from pipeline.data.readers import list_imagenet
    from tests.support import VIEWS_SEED, write_imagenet_jpegs

    records = list_imagenet(write_imagenet_jpegs(tmp_path / "imagenet"))
    monkeypatch.setattr(shards, "encode_jpeg", lambda image, quality: np.frombuffer(b"\xff\xd8garbage", np.uint8))
    cfg = section_defaults("views", overrides={"n_views": 2, "shards": 1, "part_size": 4, "image_size": 32})
    writer = shards.ShardWriter(
        records, "warp", 0, cfg, VIEWS_SEED, tmp_path / "shard-0.h5", tmp_path / "r.csv", tmp_path / "parts"
    )
    with pytest.raises(ViewsError, match=r"shard 0: the real image of '.+' does not decode"):
        writer.run()
    assert not list((tmp_path / "parts").glob("part-*.h5"))
