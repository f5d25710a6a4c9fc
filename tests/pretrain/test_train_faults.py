"""Pretraining faults (issues 13, 19): a broken bag never costs finished training, a diverged step
is never kept as the last good state, and unreadable images are skipped, listed in rejects.csv and
counted for the whole job. Tiny: vit_mini_patch8 at 32 px."""

import multiprocessing
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.pretrain.train import main as pretrain_main
from pipeline.pretrain.train import train
from tests.support import (
    HANG_GUARD_S,
    ROOT,
    bag_dataset,
    huge_lr_at,
    pretrain_setup,
    sha256_hex,
    train_command,
    write_bag,
    write_imagenet,
)

pytestmark = pytest.mark.fault  # every case here is a fault-injection case (pytest -m fault)


@pytest.mark.slow  # a training subprocess (the CLI as Snakemake runs it) and two in-process reruns
def test_truncated_bag_costs_no_finished_training(tmp_path):
    """Train via the CLI, truncate the bag (the rerun fails naming it, and Snakemake removes the
    job's outputs), rebuild it byte-identical: the rerun resumes the finished state in the state
    dir, redoes no epoch and writes the identical checkpoint."""
    bag = tmp_path / "bag.h5"
    write_bag(bag, [f"c/{i:03d}" for i in range(16)])
    original = bag.read_bytes()
    cell = {"arch": "vit_mini_patch8", "anchors": 2, "anchor_mask": 0.25, "epochs": 2, "target": "either"}
    settings = {"img_size": 32, "batch_size": 8, "micro_batch": 4, "num_workers": 0, "samples_per_epoch": 16}
    out = tmp_path / "run"
    cmd = train_command(cell, settings, out, "--bag", str(bag))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run():
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)

    assert run().returncode == 0
    checkpoint, log = out / "checkpoint.pth", out / "train_log.csv"
    finished, curve = sha256_hex(checkpoint), pd.read_csv(log)
    for broken in (original[: len(original) // 2], b""):  # truncated, then zero bytes
        bag.write_bytes(broken)
        with pytest.raises(Exception, match=str(bag)):  # the same entry point, in-process (faster)
            pretrain_main(cmd[cmd.index("train") + 1 :])
        for output in (checkpoint, log):  # what Snakemake does to a failed job's outputs
            output.unlink(missing_ok=True)
    bag.write_bytes(original)
    rerun = run()
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stderr and "epoch 2, step 4" in rerun.stderr, rerun.stderr[-3000:]
    assert sha256_hex(checkpoint) == finished and pd.read_csv(log).equals(curve)


# ---------------------------------------------------------------------------------------------
# "last good" is good: a state is kept only if its weights and update size are healthy (issue 19)


def _healthy(state: dict, initial_max: float) -> bool:
    weights = [v.float() for k, v in state["model"].items() if v.is_floating_point()]
    return all(torch.isfinite(w).all() for w in weights) and max(w.abs().max() for w in weights) <= 100 * initial_max


@pytest.mark.parametrize(
    "bad_step, kept_epoch",
    [(1, None), (3, 1)],
    ids=["first-epoch: no state kept", "last step of epoch 2: epoch 1 kept"],
)
def test_pretraining_never_keeps_a_diverged_state_as_last_good(tmp_path, monkeypatch, bad_step, kept_epoch):
    """Before: the loss rule alone kept the state saved after a huge-lr step (finite, weights in the
    thousands), and resuming it NaN'd at once. Now the step's weights and update are checked before
    any state holds them; resuming the kept state trains on."""
    from pipeline.pretrain import engine
    from pipeline.resume import UnhealthyWeightsError

    cell, settings = pretrain_setup(epochs=3, checkpoint_every=1)  # 2 steps an epoch
    state_dir, last = tmp_path / "state", tmp_path / "state" / "last.pth"
    huge_lr_at(engine, bad_step, monkeypatch)
    with pytest.raises(UnhealthyWeightsError, match=f"after the update of step {bad_step}: .*stopped before saving"):
        train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=state_dir)
    monkeypatch.undo()
    if kept_epoch is None:
        assert not last.exists()
    else:
        kept = torch.load(last, weights_only=True)
        assert kept["epoch"] == kept_epoch and _healthy(kept, initial_max=1.0)  # LayerNorm ones: init max 1
    history = train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=state_dir)
    assert len(history["loss"]) == 6 and all(np.isfinite(history["loss"]))


# ---------------------------------------------------------------------------------------------
# rejects.csv of CropMAE / SiamMAE pretraining: written whenever non-empty, counted for the job


def _bad_image_sources(method: str, root: Path, n_bad: int) -> tuple[dict, list[Path]]:
    """A tiny root for ``method`` with ``n_bad`` unreadable images among 16 readable ones."""
    rng = np.random.default_rng(1)
    if method == "cropmae":
        write_imagenet(root / "imagenet", n=16)
        bad = [root / "imagenet" / "train" / f"n{i % 2:08d}" / f"bad{i}.JPEG" for i in range(n_bad)]
        source = {"imagenet_root": root / "imagenet"}
    else:
        for v in range(8):  # 8 videos of 2 frames: every pair of a video is (frame 0, frame 1)
            (root / "videos" / f"v{v}").mkdir(parents=True)
            for t in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"videos/v{v}/{t}.jpg")
        bad = [root / "videos" / f"v{2 * i}" / "1.jpg" for i in range(n_bad)]
        source = {"videos_root": root / "videos"}
    for i, path in enumerate(bad):
        path.write_bytes(b"" if i % 2 else b"\xff\xd8\xff\xe0" + rng.bytes(300))
    return source, bad


def _pretrain_with_rejects(method: str, tmp_path: Path, workers: int, n_bad: int, max_fraction: float):
    from pipeline.pretrain.strategies import build_dataset

    source, bad = _bad_image_sources(method, tmp_path, n_bad)
    cell, settings = pretrain_setup(epochs=2, anchors=1, num_workers=workers, samples_per_epoch=32, micro_batch=4)
    cell = {**cell, "method": method}
    state_dir = tmp_path / "state"
    data = build_dataset(
        cell,
        settings,
        seed=0,
        max_reject_fraction=max_fraction,
        rejects_listing=state_dir / "rejects.csv",
        **source,
    )
    run = lambda: train(cell, settings, data, seed=0, output=tmp_path / "ck.pth", state_dir=state_dir)  # noqa: E731
    return run, state_dir / "rejects.csv", bad


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("method", ["cropmae", "siammae"])
def test_pretraining_lists_skipped_images_in_rejects_csv(tmp_path, method, workers):
    """Before: the listing the warning promises was written only when the fraction was exceeded."""
    run, listing, bad = _pretrain_with_rejects(method, tmp_path, workers, n_bad=2, max_fraction=0.5)
    run()
    assert sorted(pd.read_csv(listing)["path"]) == sorted(map(str, bad))
    assert list(pd.read_csv(listing).columns) == ["index", "image_id", "path", "reason"]


@pytest.mark.parametrize("method", ["cropmae", "siammae"])
def test_the_reject_fraction_is_the_jobs_not_one_workers(tmp_path, method):
    """Before: with two loader workers each counted the bad images it read itself: 4 bad images
    placed 2 + 2 in the two workers' batches stayed under a limit of 3 per worker while the job
    was above it."""
    from pipeline.data.readers import list_imagenet, list_videos
    from pipeline.imaging import TooManyRejectsError
    from pipeline.pretrain.engine import EpochSampler
    from pipeline.pretrain.strategies import build_dataset
    from pipeline.seeding import derive_seed

    rng = np.random.default_rng(1)
    if method == "cropmae":
        write_imagenet(tmp_path / "imagenet", n=20)
        files = [[r.path] for r in list_imagenet(tmp_path / "imagenet")]
        source = {"imagenet_root": tmp_path / "imagenet"}
    else:
        for v in range(20):
            (tmp_path / "videos" / f"v{v:02d}").mkdir(parents=True)
            for t in range(2):
                frame = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(frame).save(tmp_path / f"videos/v{v:02d}/{t}.jpg")
        files = [v.frames for v in list_videos(tmp_path / "videos")]
        source = {"videos_root": tmp_path / "videos"}
    total = sum(map(len, files))
    # one epoch of 4 micro-batches of 4: worker 0 reads batches 0 and 2, worker 1 batches 1 and 3
    cell, settings = pretrain_setup(epochs=1, anchors=1, num_workers=2, samples_per_epoch=16, micro_batch=4)
    order = EpochSampler(len(files), 16, derive_seed(0, "order")).order(0)
    worker = {int(i): (k // 4) % 2 for k, i in enumerate(order)}
    picked = [i for w in (0, 1) for i in [i for i in dict.fromkeys(map(int, order)) if worker[i] == w][:2]]
    bad = [Path(files[i][-1]) for i in picked]
    for path in bad:
        path.write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
    state_dir = tmp_path / "state"
    data = build_dataset(
        {**cell, "method": method},
        settings,
        seed=0,
        max_reject_fraction=3.5 / total,  # 3 allowed
        rejects_listing=state_dir / "rejects.csv",
        **source,
    )
    with pytest.raises(TooManyRejectsError, match=f"4 of {total} "):
        train({**cell, "method": method}, settings, data, seed=0, output=tmp_path / "ck.pth", state_dir=state_dir)
    # the error's traceback still holds the loader's iterator: its workers are shut down all the same
    # (before: they lived until a garbage collection, which then waited 5 s for each)
    assert multiprocessing.active_children() == []
    assert set(map(str, bad)) <= set(pd.read_csv(state_dir / "rejects.csv")["path"])
