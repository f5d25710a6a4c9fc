"""Propagation stage: queue semantics, radius mask, labels, read-out, fast == reference, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.cli import run
from pipeline.pretrain.checkpoints import import_external_encoder, init_random_encoder
from pipeline.propagation import algorithm as A
from pipeline.propagation import run as propagation_run
from tests.propagation_reference import propagate_reference

# ---------------------------------------------------------------------------------------------
# geometry


def test_grid_sizes_follow_the_patch_size():
    davis = A.input_size((480, 854), [480, 880])
    assert davis == (480, 880)
    assert A.grid_size(davis, 16) == (30, 55)
    assert A.grid_size(davis, 8) == (60, 110)
    vip = A.input_size((1080, 1920), [880])  # 16:9, long side 880, short floored to 64
    assert vip == (448, 880)
    assert A.grid_size(vip, 16) == (28, 55) and A.grid_size(vip, 8) == (56, 110)
    assert A.input_size((1920, 1080), [880]) == (880, 448)  # portrait: the width is floored
    jhmdb = A.input_size((240, 320), [320, 320])
    assert A.grid_size(jhmdb, 16) == (20, 20) and A.grid_size(jhmdb, 8) == (40, 40)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        A.grid_size((100, 880), 16)


def test_radius_mask_is_strictly_less_in_grid_cells():
    mask = A.radius_mask((5, 5), 2).reshape(5, 5, 5, 5)
    # center: offsets with dx^2 + dy^2 < 4 -> 3x3 block; (0, +-2) at distance exactly 2 excluded
    assert int(mask[2, 2].sum()) == 9
    assert not mask[2, 2, 0, 2] and mask[2, 2, 1, 1]
    assert int(mask[0, 0].sum()) == 4
    assert torch.equal(mask.reshape(25, 25), mask.reshape(25, 25).T)
    # spec §1 counts at radius 20: DAVIS /16 center 1,070, corner 331, mean 750 of 1,650
    davis = A.radius_mask((30, 55), 20)
    counts = davis.sum(1).reshape(30, 55)
    assert int(counts[15, 27]) == 1070 and int(counts[0, 0]) == 331
    assert abs(counts.float().mean().item() - 750) < 1  # 750.5
    jh = A.radius_mask((20, 20), 20).sum(1).reshape(20, 20)
    assert int(jh[10, 10]) == 400 and int(jh[0, 0]) == 331


# ---------------------------------------------------------------------------------------------
# queue


def test_context_slots_reproduce_the_padded_queue():
    q = 20
    assert A.context_slots(1, q) == [0] * 21
    assert A.context_slots(2, q) == [0] * 20 + [1]
    assert A.context_slots(q, q) == [0, 0] + list(range(1, 20))
    assert A.context_slots(q + 5, q) == [0] + list(range(5, 25))
    for t in range(1, 30):
        slots = A.context_slots(t, q)
        assert len(slots) == q + 1
        assert slots.count(0) == (22 - t if t <= q else 1)  # frame-0 multiplicity
        frames, dup = A.context_frames(t, q)
        assert frames[0] == 0 and frames[1:] == sorted(set(slots[1:]) - {0})
        assert dup == slots[1:].count(0)
    with pytest.raises(ValueError):
        A.context_slots(0, q)


# ---------------------------------------------------------------------------------------------
# propagation core


def _random_video(t, grid, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(t, grid[0] * grid[1], c, generator=g), dim=-1)


def test_one_hot_position_features_reproduce_frame0_on_a_static_video():
    grid, n_frames = (4, 6), 26
    hw = grid[0] * grid[1]
    feats = torch.eye(hw)[None].repeat(n_frames, 1, 1)  # feature = one-hot of the cell position
    ids = torch.randint(0, 3, (hw,), generator=torch.Generator().manual_seed(0))
    labels0 = torch.nn.functional.one_hot(ids, 3).float()
    preds = A.propagate(feats, labels0, grid, topk=7, temperature=0.7, radius=20, queue=20, query_chunk=5)
    torch.testing.assert_close(preds, labels0[None].expand_as(preds), atol=1e-6, rtol=0)
    for t in range(n_frames):
        out = A.segmentation_readout(preds[t].reshape(*grid, 3).numpy(), grid, [0, 1, 2])
        np.testing.assert_array_equal(out, ids.reshape(grid).numpy())


@pytest.mark.parametrize("case", ["davis", "jhmdb"])
def test_fast_path_equals_the_reference_algorithm(case):
    if case == "davis":  # soft one-hot-ish labels, radius that masks, several query chunks
        grid, n_frames, topk, radius, queue, chunk = (6, 11), 28, 7, 4, 20, 17
        g = torch.Generator().manual_seed(1)
        labels0 = torch.nn.functional.one_hot(torch.randint(0, 4, (66,), generator=g), 4).float()
    else:  # JHMDB-like: heatmaps + background, radius barely restricts, short queue
        grid, n_frames, topk, radius, queue, chunk = (8, 8), 14, 7, 20, 5, 64
        joints = np.array([[1.0, 3.3, 6.8, 7.6], [0.2, 4.1, 2.5, 7.9]])
        labels0 = torch.from_numpy(A.jhmdb_heatmaps(joints, grid)).reshape(64, -1)
    feats = _random_video(n_frames, grid, 32, seed=2)
    kwargs = dict(topk=topk, temperature=0.7, radius=radius, queue=queue)
    fast = A.propagate(feats, labels0, grid, query_chunk=chunk, **kwargs)
    ref = propagate_reference(feats, labels0, grid, **kwargs)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    # the duplicates matter: without frame 0's padded copies the early frames differ
    single = propagate_reference(feats, labels0, grid, **{**kwargs, "queue": 1})
    assert (single[2] - ref[2]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# labels and read-out


def test_segmentation_labels_point_sample_at_the_patch_center():
    ids = np.zeros((8, 16), np.uint8)
    ids[3:5, 3:5] = 1  # only the patch-center pixels 3-4 of the first /8 patch
    ids[:, 8:] = 2
    ids[3:5, 11:13] = 0
    bil = A.segmentation_labels(ids, [0, 1, 2], (1, 2))
    np.testing.assert_allclose(bil[0, 0], [0, 1, 0])
    np.testing.assert_allclose(bil[0, 1], [1, 0, 0])
    area = A.segmentation_labels(ids, [0, 1, 2], (1, 2), downsample="area")
    np.testing.assert_allclose(area[0, 0], [60 / 64, 4 / 64, 0])
    np.testing.assert_allclose(area[0, 1], [4 / 64, 0, 60 / 64])
    single = A.segmentation_labels(ids, [1], (1, 2))  # one channel keeps its axis
    assert single.shape == (1, 2, 1)


def test_jhmdb_heatmap_stamp_and_border_quirk():
    grid = (6, 7)
    joints = np.array([[1.0, 4.6, -10.0], [0.2, 3.4, -10.0]])  # x row, y row
    maps = A.jhmdb_heatmaps(joints, grid)
    assert maps.shape == (6, 7, 4)
    # (1.0, 0.2): the stamp's corner int(pt - 1.5) truncates toward zero -> peak at col 2, row 1
    j0 = maps[..., 1]
    assert np.unravel_index(j0.argmax(), grid) == (1, 2) and j0[1, 2] == 1
    np.testing.assert_allclose(j0[1, 1], math.exp(-2), rtol=1e-6)
    np.testing.assert_allclose(j0[0, 1], math.exp(-4), rtol=1e-6)
    # truncated stamp: rows int(-1.3) = -1 .. 1 clipped to 0..1, cols 0 .. int(3.5) - 1 = 2
    assert (j0 > 0).sum() == 6 and j0[:, 3:].sum() == 0 and j0[2:].sum() == 0
    # (4.6, 3.4): away from the border the peak is round(pt)
    j1 = maps[..., 2]
    assert np.unravel_index(j1.argmax(), grid) == (3, 5)
    assert (j1 > 0).sum() == 16  # full 4x4 stamp, offsets -2..+1
    assert maps[..., 3].sum() == 0  # a joint outside the frame: all-zero channel
    np.testing.assert_array_equal(maps[..., 0], (maps[..., 1:].sum(-1) == 0).astype(np.float32))


def test_keypoint_readout_top5_example_of_the_spec():
    grid = (10, 10)
    pred = np.zeros((100, 3), np.float32)
    pred[4 * 10 + 6, 1] = 1.0  # (col 6, row 4)
    pred[4 * 10 + 7, 1] = 0.5
    pred[5 * 10 + 6, 1] = 0.25
    coords = A.keypoints_readout(pred, grid, topk=5)
    np.testing.assert_allclose(coords[:, 0].numpy(), [6.285715, 4.142858], rtol=1e-6)
    np.testing.assert_array_equal(coords[:, 1].numpy(), [-1, -1])  # all-zero map


def test_segmentation_readout_upsamples_then_maps_ids():
    pred = np.zeros((2, 2, 2), np.float32)
    pred[..., 0] = 1
    pred[1, 1] = [0, 1]
    ids = A.segmentation_readout(pred, (4, 4), [0, 5], out_hw=(8, 8))
    assert ids.dtype == np.uint8 and ids.shape == (8, 8)
    assert ids[-1, -1] == 5 and ids[0, 0] == 0


# ---------------------------------------------------------------------------------------------
# end to end on tiny synthetic datasets


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "random-init" / "checkpoint.pth"
    init_random_encoder("vit_mini_patch8", 0, path, img_size=32)
    return path


def test_random_init_checkpoint_is_seeded_and_loadable(tiny_encoder, tmp_path):
    from pipeline.pretrain.checkpoints import load_encoder

    again = tmp_path / "again.pth"
    init_random_encoder("vit_mini_patch8", 0, again, img_size=32)
    a, b = load_encoder(tiny_encoder), load_encoder(again)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    other = tmp_path / "other.pth"
    init_random_encoder("vit_mini_patch8", 1, other, img_size=32)
    assert not torch.equal(load_encoder(other).blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)
    # an external checkpoint missing encoder keys fails loudly instead of keeping random weights
    ckpt = torch.load(tiny_encoder, weights_only=True)
    del ckpt["model"]["blocks.0.attn.qkv.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(ckpt["model"], broken)
    with pytest.raises(KeyError, match="blocks.0.attn.qkv.weight"):
        import_external_encoder(broken, "vit_mini_patch8", tmp_path / "imported.pth")


def test_davis_end_to_end_writes_every_output(tiny_encoder, tmp_path):
    import pandas as pd
    from PIL import Image

    from pipeline.data import synthetic

    root = tmp_path / "davis"
    synthetic.make_davis(root, dict(sequences=2, frames=5, height=40, width=56, max_objects=2), 0)
    out = tmp_path / "eval"
    settings = {"davis": {"size": [32, 48], "gt_mode": "native"}, "queue": 3, "figures": 1}
    run(
        "propagation",
        [
            "run",
            "--checkpoint",
            str(tiny_encoder),
            "--dataset",
            "davis",
            "--root",
            str(root),
            "--output-dir",
            str(out),
            "--settings",
            __import__("json").dumps(settings),
            "--model",
            "random-init/test",
            "--threads",
            "1",
        ],
    )
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns[:5]) == ["dataset", "model", "J&F-Mean", "J-Mean", "F-Mean"]
    row = metrics.iloc[0]
    assert row["dataset"] == "davis" and row["patch_size"] == 8 and row["gt_mode"] == "native"
    assert 0 <= row["J-Mean"] <= 100 and row["J&F-Mean"] == pytest.approx((row["J-Mean"] + row["F-Mean"]) / 2)
    for seq in ("seq-000", "seq-001"):
        pngs = sorted((out / "predictions" / seq).glob("*.png"))
        assert [p.stem for p in pngs] == [f"{t:05d}" for t in range(5)]
        with Image.open(pngs[1]) as im:  # indexed, at the native GT size
            assert im.mode == "P" and im.size == (56, 40)
        with Image.open(pngs[0]) as im, Image.open(root / "Annotations/480p" / seq / "00000.png") as gt:
            # frame 0's prediction is its own label map (through the grid and back)
            assert set(np.unique(np.array(im))) <= set(np.unique(np.array(gt)))
    assert (out / "scores" / "per-sequence_results-val.csv").is_file()
    assert (out / "figures" / "seq-000.png").is_file() and not (out / "figures" / "seq-001.png").exists()
    # rerun with the same key resumes (nothing recomputed), a different protocol starts afresh
    before = (out / "predictions" / "seq-000" / "00002.png").stat().st_mtime_ns
    propagation_run.run_propagation(tiny_encoder, "davis", root, out, settings)
    assert (out / "predictions" / "seq-000" / "00002.png").stat().st_mtime_ns == before
    (out / "predictions" / "stale").mkdir()
    propagation_run.run_propagation(tiny_encoder, "davis", root, out, {**settings, "queue": 2})
    assert not (out / "predictions" / "stale").exists()


def test_jhmdb_end_to_end_writes_pos_img_in_original_pixels(tiny_encoder, tmp_path):
    import pandas as pd

    from pipeline.data import synthetic
    from pipeline.data.readers import JhmdbDataset, read_pos_img

    root = tmp_path / "jhmdb"
    synthetic.make_jhmdb(root, dict(classes=1, videos_per_class=1, frames=4, height=48, width=64), 0)
    out = tmp_path / "eval"
    row = propagation_run.run_propagation(tiny_encoder, "jhmdb", root, out, {"jhmdb": {"size": [40, 40]}, "figures": 0})
    ds = JhmdbDataset(root)
    video = ds.videos[0]
    pred, gt = read_pos_img(out / "predictions" / video / "joint_positions.mat"), ds.read_joints(video)
    assert pred.shape == gt.shape
    placed = np.isfinite(pred[0, :, 0])
    # frame 0 is the read-out of its own heatmaps: within two grid cells (5x5 grid, 12.8 px wide)
    assert placed.sum() >= 10
    assert np.abs(pred[:, placed, 0] - gt[:, placed, 0]).max() < 2 * 64 / 5
    assert {"PCK@0.1", "PCK@0.2"} <= set(pd.read_csv(out / "metrics.csv").columns)
    assert 0 <= row["PCK@0.2"] <= 100


def test_vip_end_to_end_writes_class_ids_at_the_gt_size(tiny_encoder, tmp_path):
    from PIL import Image

    from pipeline.data import synthetic
    from pipeline.data.readers import VipDataset

    root = tmp_path / "vip"
    synthetic.make_vip(root, dict(videos=1, frames=3, height=72, width=128), 0)
    out = tmp_path / "eval"
    # long side 128 -> 72 x 128 becomes 64 x 128 (short side floored to a multiple of 64)
    row = propagation_run.run_propagation(tiny_encoder, "vip", root, out, {"vip": {"size": [128]}, "figures": 1})
    ds = VipDataset(root)
    video = ds.videos[0]
    for gt_path in ds.annotations(video):
        with Image.open(out / "predictions" / video / gt_path.name) as im, Image.open(gt_path) as gt:
            assert im.mode == "L" and im.size == gt.size == (128, 72)
    assert 0 <= row["mIoU"] <= 100 and row["size"] == "128"
    assert (out / "figures" / f"{video}.png").is_file()
