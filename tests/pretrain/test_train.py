"""Pretraining loop: lr schedule, weight-decay groups, sampler, exact resume, SIGKILL resume, NaN stop,
checkpoint format. Tiny: vit_mini_patch8 at 32 px, a few optimizer steps."""

import math
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import run
from pipeline.io import record_digest
from pipeline.pretrain.engine import EpochSampler, NonFiniteLossError, lr_at
from pipeline.pretrain.strategies import BagViewsDataset
from pipeline.pretrain.train import build_optimizer, train
from tests.support import (
    HANG_GUARD_S,
    PRETRAIN_SETTINGS,
    ROOT,
    bag_dataset,
    pretrain_setup,
    sha256_hex,
    train_command,
    wait_until,
    write_bad_images,
    write_bag,
    write_imagenet,
)


class FaultyBag(BagViewsDataset):
    """Crashes (``mode="crash"``) or yields NaN pixels (``mode="nan"``) from epoch ``at_epoch`` on."""

    def __init__(self, *args, at_epoch, mode, **kwargs):
        super().__init__(*args, **kwargs)
        self.at_epoch, self.mode = at_epoch, mode

    def __getitem__(self, key):
        x = super().__getitem__(key)
        if key[0] >= self.at_epoch:
            if self.mode == "crash":
                raise RuntimeError("simulated crash")
            x = torch.full_like(x, float("nan"))
        return x


# ---------------------------------------------------------------------------------------------


def test_lr_schedule_hand_values():
    kw = dict(total=4, warmup=1, peak_lr=1.0, min_lr=0.0)
    assert lr_at(0, 10, **kw) == 0.0  # applied before step 0: not the peak
    assert lr_at(5, 10, **kw) == pytest.approx(0.5)  # half-way through warm-up
    assert lr_at(10, 10, **kw) == pytest.approx(1.0)  # end of warm-up = peak
    assert lr_at(25, 10, **kw) == pytest.approx(0.5)  # cosine mid-point
    assert lr_at(20, 10, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert lr_at(40, 10, **kw) == pytest.approx(0.0)
    assert lr_at(25, 10, total=4, warmup=1, peak_lr=1.0, min_lr=0.2) == pytest.approx(0.6)


def test_weight_decay_groups():
    from pipeline.pretrain.models_mae import CrossViewMAE

    model = CrossViewMAE("vit_mini_patch8", 32)
    opt = build_optimizer(model, 1e-3, 0.05)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    decay, no_decay = by_decay[0.05], by_decay[0.0]
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim <= 1 for n in no_decay)
    assert all(model.get_parameter(n).ndim > 1 and not n.endswith(".bias") for n in decay)
    assert {"encoder.cls_token", "mask_token", "encoder.patch_embed.proj.weight"} <= decay  # 3-D/4-D: decayed
    assert "encoder.norm.weight" in no_decay and "decoder_pred.bias" in no_decay
    frozen = {"encoder.pos_embed", "decoder_pos_embed"}
    assert not frozen & (decay | no_decay)
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}


def test_epoch_sampler_order():
    s = EpochSampler(10, 25, seed=1)
    s.set_epoch(0)
    a = [i for _, i in s]
    assert len(a) == 25 and all(0 <= i < 10 for i in a)
    assert sorted(a[:10]) == list(range(10))  # whole permutations back to back
    s.set_epoch(1)
    assert [i for _, i in s] != a
    s.set_epoch(0)
    assert [i for _, i in s] == a
    ranks = [EpochSampler(10, 8, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    parts = [[i for _, i in r] for r in ranks]
    assert len(parts[0]) == len(parts[1]) == 4 and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(EpochSampler(10, 8, seed=1).order(0).tolist())


def test_schedule_applied_before_step_and_logs(tmp_path):
    cell, settings = pretrain_setup(epochs=2)
    hist = train(
        cell,
        settings,
        bag_dataset(),
        seed=0,
        output=tmp_path / "ck.pth",
        state_dir=tmp_path / "state",
        log_csv=tmp_path / "log.csv",
        curve_png=tmp_path / "curve.png",
    )
    peak = 1e-3 * 8 / 256
    assert hist["lr"][0] == 0.0 and hist["lr"][1] == pytest.approx(peak / 2)  # 2 steps per epoch
    assert hist["lr"][2] == pytest.approx(peak)
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log.columns) == ["step", "epoch", "loss", "lr", "samples_per_s"]
    assert log["step"].tolist() == [0, 1, 2, 3] and log["epoch"].tolist() == [0, 0, 1, 1]
    assert np.isfinite(log["loss"]).all()
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_weights_only_and_load_encoder(tmp_path):
    from pipeline.pretrain.checkpoints import load_encoder

    cell, settings = pretrain_setup(epochs=1)
    train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "state")
    ckpt = torch.load(tmp_path / "ck.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "arch", "img_size", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 2 and ckpt["img_size"] == 32
    assert ckpt["config"]["cell"] == cell and ckpt["config"]["seed"] == 0
    state = torch.load(tmp_path / "state" / "last.pth", weights_only=True)
    assert state["history"]["step"] == [0, 1]
    encoder = load_encoder(tmp_path / "ck.pth")
    assert torch.equal(encoder.cls_token, ckpt["model"]["cls_token"])  # MAE layout: encoder keys at the top
    assert encoder.dense_features(torch.zeros(1, 3, 32, 32)).shape == (1, 128, 4, 4)
    # the resumable state keeps our own layout
    assert "encoder.cls_token" in state["model"]


def test_checkpoint_loads_in_the_reference_loaders(tmp_path):
    """Key matching of the reference tools on our released checkpoint: CropMAE's propagation ViT
    keeps the ``ckpt["model"]`` keys its own state dict has (it printed "load [0/150] params" on
    ``encoder.``-prefixed keys), MAE's fine-tuning loads non-strictly into a timm ViT and expects only
    the head and fc_norm to be missing."""
    from timm.models.vision_transformer import VisionTransformer

    from pipeline.pretrain.models_mae import ARCHS, build_encoder

    cell, settings = pretrain_setup(epochs=1)
    train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "state")
    released = torch.load(tmp_path / "ck.pth", weights_only=True)["model"]
    cropmae_vit = build_encoder(cell["arch"], settings["img_size"]).state_dict()  # CropMAE's key names
    matched = {k: v for k, v in released.items() if k in cropmae_vit}
    assert len(matched) == len(cropmae_vit)  # "load [n/n] params"
    a = ARCHS[cell["arch"]]
    finetune = VisionTransformer(
        img_size=settings["img_size"],
        patch_size=a["patch_size"],
        embed_dim=a["embed_dim"],
        depth=a["depth"],
        num_heads=a["num_heads"],
        qkv_bias=True,
        global_pool="avg",
        fc_norm=True,
        num_classes=10,
    )
    msg = finetune.load_state_dict(released, strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def test_resume_continues_the_same_loss_curve(tmp_path):
    cell, settings = pretrain_setup(epochs=3)
    full = train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "a.pth", state_dir=tmp_path / "sa")

    faulty = bag_dataset(FaultyBag, at_epoch=2, mode="crash")
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies during epoch 2
        train(cell, settings, faulty, seed=0, output=tmp_path / "b.pth", state_dir=tmp_path / "sb")
    assert not (tmp_path / "b.pth").exists()
    assert torch.load(tmp_path / "sb" / "last.pth", weights_only=True)["epoch"] == 2
    resumed = train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "b.pth", state_dir=tmp_path / "sb")

    assert resumed["step"] == full["step"] == list(range(6))
    assert resumed["loss"] == full["loss"]  # bit-identical, not just close
    assert resumed["lr"] == full["lr"]
    a, b = (torch.load(tmp_path / p, weights_only=True)["model"] for p in ("a.pth", "b.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different seed gives a different curve (the comparison above can fail)
    other = train(cell, settings, bag_dataset(), seed=1, output=tmp_path / "c.pth", state_dir=tmp_path / "sc")
    assert other["loss"] != full["loss"]


def test_changed_settings_do_not_resume_a_stale_state(tmp_path):
    cell, settings = pretrain_setup(epochs=1)
    train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "a.pth", state_dir=tmp_path / "s")
    cell2, settings2 = pretrain_setup(epochs=1, base_lr=5e-4)
    hist = train(cell2, settings2, bag_dataset(), seed=0, output=tmp_path / "b.pth", state_dir=tmp_path / "s")
    assert hist["step"] == [0, 1]  # trained from scratch, not "already done"
    assert torch.load(tmp_path / "s" / "last.pth", weights_only=True)["config"]["pretrain"]["base_lr"] == 5e-4


@pytest.mark.fault
def test_exploding_finite_loss_stops_and_keeps_the_last_healthy_state(tmp_path, monkeypatch):
    """A loss that explodes but stays finite (2 -> 1.5e6 at base_lr 100) stops by the documented
    rule (> divergence_factor x the lowest loss so far), before the update, and the kept state is the
    last epoch end whose every loss passed the rule."""
    from pipeline.pretrain import engine

    cell, settings = pretrain_setup(epochs=3)
    real = engine.forward_backward
    calls = {"n": 0}

    def exploding(loop, batches):
        loss = real(loop, batches)
        calls["n"] += 1
        return loss * 1e6 if calls["n"] == 5 else loss  # step 4 = epoch 2's first step

    monkeypatch.setattr(engine, "forward_backward", exploding)
    state = tmp_path / "state" / "last.pth"
    with pytest.raises(engine.DivergedLossError, match=r"divergence_factor 10 x the lowest.*at step 4 \(epoch 2\)"):
        train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "state")
    kept = torch.load(state, weights_only=True)
    assert kept["epoch"] == 2 and max(kept["history"]["loss"]) < 10 * min(kept["history"]["loss"])
    assert not (tmp_path / "ck.pth").exists()
    # the rule is a setting: a looser factor lets the same spike through
    monkeypatch.setattr(engine, "forward_backward", real)
    cell2, loose = pretrain_setup(epochs=3, divergence_factor=1e9)
    calls["n"] = 0
    monkeypatch.setattr(engine, "forward_backward", exploding)
    train(cell2, loose, bag_dataset(), seed=0, output=tmp_path / "ck2.pth", state_dir=tmp_path / "state2")


@pytest.mark.fault
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cell, settings = pretrain_setup(epochs=3)
    state = tmp_path / "state" / "last.pth"
    faulty = bag_dataset(FaultyBag, at_epoch=1, mode="nan")
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(epoch 1\).*last good checkpoint .*epoch 1"):
        train(cell, settings, faulty, seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "state")
    assert not (tmp_path / "ck.pth").exists()
    kept = torch.load(state, weights_only=True)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values())
    digest = sha256_hex(state)
    # retrying keeps failing at the same step and never overwrites the good state
    faulty = bag_dataset(FaultyBag, at_epoch=1, mode="nan")
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        train(cell, settings, faulty, seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "state")
    assert sha256_hex(state) == digest


def test_epoch_shorter_than_a_batch_is_a_clear_error(tmp_path):
    cell, settings = pretrain_setup(epochs=1, samples_per_epoch=4)
    with pytest.raises(ValueError, match="shorter than one batch"):
        train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "s")


# ---------------------------------------------------------------------------------------------
# a real subprocess, SIGKILLed mid-run, then re-run: same curve as an uninterrupted run


def cli(tmp_path, name, imagenet, epochs):
    settings = {**PRETRAIN_SETTINGS, "batch_size": 4, "micro_batch": 4, "samples_per_epoch": 8}
    cell = {
        "method": "cropmae",
        "arch": "vit_mini_patch8",
        "generator": "none",
        "target": "none",
        "anchors": 1,
        "anchor_mask": 0.0,
        "target_mask": 0.75,
        "epochs": epochs,
    }
    out = tmp_path / name
    cmd = train_command(cell, settings, out, "--imagenet-root", str(imagenet))
    return out, [*cmd, "--curve-png", str(out / "loss_curve.png"), "--device", "cpu"]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_the_same_curve(tmp_path):
    imagenet = tmp_path / "imagenet"
    write_imagenet(imagenet)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    epochs = 6

    out_a, cmd_a = cli(tmp_path, "uninterrupted", imagenet, epochs)
    subprocess.run(cmd_a, env=env, cwd=ROOT, check=True, capture_output=True, timeout=HANG_GUARD_S)

    out_b, cmd_b = cli(tmp_path, "killed", imagenet, epochs)
    proc = subprocess.Popen(cmd_b, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out_b / "state" / "last.pth"
    wait_until(lambda: state.exists() or proc.poll() is not None, poll_s=0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out_b / "checkpoint.pth").exists()
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= killed_at < epochs

    subprocess.run(cmd_b, env=env, cwd=ROOT, check=True, capture_output=True, timeout=HANG_GUARD_S)
    a, b = pd.read_csv(out_a / "train_log.csv"), pd.read_csv(out_b / "train_log.csv")
    assert len(a) == len(b) == epochs * 2
    assert a["loss"].tolist() == b["loss"].tolist() and a["lr"].tolist() == b["lr"].tolist()
    ca, cb = (torch.load(o / "checkpoint.pth", weights_only=True)["model"] for o in (out_a, out_b))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as done:
        run("pretrain", ["train", "--help"])
    assert done.value.code == 0 and "--state-dir" in capsys.readouterr().out


def test_cli_cdgmae_knn_from_an_hdf5_bag(tmp_path):
    from pipeline.data.readers import list_imagenet

    imagenet = tmp_path / "imagenet"
    write_imagenet(imagenet, n=8)
    ids = [r.image_id for r in list_imagenet(imagenet)]
    write_bag(tmp_path / "bag.h5", ids)
    n = len(ids)
    np.savez(
        tmp_path / "knn.npz",
        image_id=np.array(ids),
        neighbours=np.array([[(i + 1) % n, (i + 2) % n] for i in range(n)], dtype=np.int64),
    )
    settings = {**PRETRAIN_SETTINGS, "batch_size": 4, "micro_batch": 2, "samples_per_epoch": None}
    cell = {
        "method": "cdgmae",
        "arch": "vit_mini_patch8",
        "generator": "warp",
        "target": "knn",
        "anchors": 2,
        "anchor_mask": 0.5,
        "target_mask": 0.75,
        "epochs": 1,
    }
    out = tmp_path / "run"
    sources = ("--bag", str(tmp_path / "bag.h5"), "--knn", str(tmp_path / "knn.npz"), "--imagenet-root", str(imagenet))
    cmd = train_command(cell, settings, out, *sources, log_csv="log.csv")
    run("pretrain", cmd[cmd.index("train") :])  # the CLI in this process, as python -m dispatches it
    assert len(pd.read_csv(out / "log.csv")) == n // 4
    assert torch.load(out / "checkpoint.pth", weights_only=True)["config"]["cell"]["target"] == "knn"


def test_mask_keeping_no_patch_is_a_clear_error(tmp_path):
    cell, settings = pretrain_setup(epochs=1)  # 32 px / patch 8 = 16 patches; 0.985 keeps int(0.24) = 0
    with pytest.raises(ValueError, match="target_mask=0.985 keeps no patch of the 16"):
        train(
            {**cell, "target_mask": 0.985},
            settings,
            bag_dataset(),
            seed=0,
            output=tmp_path / "ck.pth",
            state_dir=tmp_path / "s",
        )


def test_regenerated_bag_starts_over_but_a_plain_rerun_resumes(tmp_path, caplog):
    from pipeline.views.bag import BagDataset

    bag_path = tmp_path / "bag.h5"
    write_bag(bag_path, [f"c/{i:03d}" for i in range(16)], seed=1)
    cell, settings = pretrain_setup(epochs=1)

    def run():
        dataset = BagViewsDataset(BagDataset(bag_path), img_size=32, anchors=2, target="either", seed=3)
        return train(cell, settings, dataset, seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "state")

    caplog.set_level("INFO", logger="cdgmae.pretrain")
    first = run()
    caplog.clear()
    assert run()["loss"] == first["loss"]
    assert "resuming from" in caplog.text and "starting over" not in caplog.text  # a retry resumes
    caplog.clear()
    time.sleep(0.01)
    write_bag(bag_path, [f"c/{i:03d}" for i in range(16)], seed=2)  # the views stage re-ran
    again = run()
    assert "older input data or older code" in caplog.text and "starting over" in caplog.text
    assert "resuming from" not in caplog.text
    assert again["step"] == first["step"] and again["loss"] != first["loss"]  # trained anew on the new bag


@pytest.mark.fault
def test_byte_identical_rebuilt_bag_resumes(tmp_path, caplog):
    """Resume keys on the bag's content: rebuilding it byte for byte (new mtime) or moving the
    project keeps the finished state (before: the mtime started training over)."""
    from pipeline.views.bag import BagDataset

    bag_path = tmp_path / "a" / "bag.h5"
    bag_path.parent.mkdir()
    write_bag(bag_path, [f"c/{i:03d}" for i in range(16)], seed=1)
    cell, settings = pretrain_setup(epochs=1)

    def run(path, state):
        dataset = BagViewsDataset(BagDataset(path), img_size=32, anchors=2, target="either", seed=3)
        return train(cell, settings, dataset, seed=0, output=tmp_path / "ck.pth", state_dir=state)

    caplog.set_level("INFO", logger="cdgmae.pretrain")
    first = run(bag_path, tmp_path / "state")
    time.sleep(0.01)
    original = bag_path.read_bytes()
    bag_path.unlink()
    bag_path.write_bytes(original)  # same bytes, new inode and mtime
    caplog.clear()
    assert run(bag_path, tmp_path / "state")["loss"] == first["loss"]
    assert "resuming from" in caplog.text and "starting over" not in caplog.text
    moved = tmp_path / "b" / "bag.h5"  # the project moved: same content elsewhere
    moved.parent.mkdir()
    moved.write_bytes(original)
    record_digest(moved)
    caplog.clear()
    run(moved, tmp_path / "state")
    assert "resuming from" in caplog.text and "starting over" not in caplog.text


def test_loss_curve_does_not_depend_on_loader_workers(tmp_path):
    cell, settings = pretrain_setup(epochs=1)
    base = train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "a.pth", state_dir=tmp_path / "sa")
    cell, settings = pretrain_setup(epochs=1, num_workers=2)
    workers = train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "b.pth", state_dir=tmp_path / "sb")
    assert workers["loss"] == base["loss"]


@pytest.mark.fault
def test_cropmae_skips_and_lists_unreadable_images(tmp_path, caplog):
    """One bad-image policy (``pipeline.imaging.ImageRejects``): skipped with a logged reason,
    listed, an error above the fraction (before: the first bad image crashed pretraining)."""
    from pipeline.data.readers import list_imagenet
    from pipeline.imaging import TooManyRejectsError
    from pipeline.pretrain.strategies import GlobalToLocalDataset

    root = tmp_path / "imagenet"
    write_imagenet(root, n=8)
    bad = write_bad_images(root / "train" / "n00000000")
    records = list_imagenet(root)
    listing = tmp_path / "rejects.csv"
    data = GlobalToLocalDataset(records, img_size=32, seed=0, max_reject_fraction=0.25, rejects_listing=listing)
    caplog.set_level("WARNING", logger="cdgmae.imaging")
    samples = [data[(0, i)] for i in range(len(data))]
    assert all(s.shape == (2, 3, 32, 32) and torch.isfinite(s).all() for s in samples)
    assert sorted(r[2] for r in data.rejects.rows.values()) == sorted(map(str, bad))
    assert all(str(p) in caplog.text for p in bad)
    again = GlobalToLocalDataset(records, img_size=32, seed=0, max_reject_fraction=0.25)
    assert all(torch.equal(a, again[(0, i)]) for i, a in enumerate(samples))  # substitutes are seeded
    strict = GlobalToLocalDataset(records, img_size=32, seed=0, max_reject_fraction=0.1, rejects_listing=listing)
    with pytest.raises(TooManyRejectsError, match=f"2 of 10 images are unreadable.*{listing}"):
        for i in range(len(strict)):
            strict[(0, i)]
    assert sorted(pd.read_csv(listing)["path"]) == sorted(map(str, bad))


@pytest.mark.fault
def test_siammae_skips_and_lists_unreadable_frames(tmp_path):
    """SiamMAE's frame reader follows the same policy: a pair with a bad frame is redrawn."""
    from PIL import Image

    from pipeline.data.readers import list_videos
    from pipeline.pretrain.strategies import VideoPairDataset

    rng = np.random.default_rng(0)
    for v in range(4):  # two frames each: every pair of a video is (frame 0, frame 1)
        (tmp_path / "videos" / f"v{v}").mkdir(parents=True)
        for t in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"videos/v{v}/{t}.jpg")
    corrupt, empty = tmp_path / "videos/v0/1.jpg", tmp_path / "videos/v2/0.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
    empty.write_bytes(b"")
    listing = tmp_path / "rejects.csv"
    data = VideoPairDataset(
        list_videos(tmp_path / "videos"), img_size=32, seed=0, max_reject_fraction=0.25, rejects_listing=listing
    )
    assert all(data[(0, i)].shape == (2, 3, 32, 32) for i in range(len(data)))
    assert sorted(r[2] for r in data.rejects.rows.values()) == sorted(map(str, (corrupt, empty)))
