"""Checkpoints and resumable states are verified against their recorded content digests on every
read, and a broken input never costs finished training (issue 13). Tiny: vit_mini_patch8 at 32 px."""

import hashlib
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.io import IntegrityError, digest_path, recorded_digest
from pipeline.pretrain.checkpoints import init_random_encoder, load_encoder
from pipeline.pretrain.train import main as pretrain_main
from pipeline.pretrain.train import train
from pipeline.resume import load_resume_state, previous_state_path, save_resume_state
from pipeline.vit_checkpoints import load_cdgmae_vit, read_state_dict
from tests.support import HANG_GUARD_S
from tests.test_pretrain import ROOT, dataset, setup, train_command, write_bag

pytestmark = pytest.mark.fault  # every case here is a fault-injection case (pytest -m fault)


def flip(path: Path, offset: int | None = None, n: int = 16) -> None:
    """Invert ``n`` bytes of ``path`` in place (in the middle unless ``offset``)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def encoder_checkpoint(tmp_path):
    path = tmp_path / "random-init" / "checkpoint.pth"
    init_random_encoder("vit_mini_patch8", 0, path, img_size=32)
    return path


def test_a_flipped_checkpoint_is_an_error_naming_it_in_every_loader(encoder_checkpoint, tmp_path):
    from pipeline.propagation import run as propagation_run

    assert recorded_digest(encoder_checkpoint) == sha(encoder_checkpoint)  # recorded when written
    load_encoder(encoder_checkpoint)  # intact: loads
    flip(encoder_checkpoint)
    for load in (load_encoder, read_state_dict, lambda p: load_cdgmae_vit(p, 32)):
        with pytest.raises(IntegrityError, match=str(encoder_checkpoint)):
            load(encoder_checkpoint)
    out = tmp_path / "propagation"
    with pytest.raises(IntegrityError, match=f"{encoder_checkpoint}: content digest"):
        propagation_run.run_propagation(encoder_checkpoint, "davis", tmp_path / "davis", out, {"figures": 0})
    assert not (out / "predictions").exists()  # nothing claimed or removed before the check


def test_an_external_checkpoint_without_digest_loads_after_its_zip_check(encoder_checkpoint, caplog):
    digest_path(encoder_checkpoint).unlink()  # as CropMAE's released weights: no record beside them
    caplog.set_level("INFO")
    encoder = load_encoder(encoder_checkpoint)  # outside results/: a user's external file
    assert encoder.img_size == 32 and "external checkpoint without a recorded digest: zip CRCs checked" in caplog.text
    assert read_state_dict(encoder_checkpoint)


def _our_checkpoint_without_digest(tmp_path, monkeypatch) -> Path:
    """A workflow checkpoint under results/ with 16 flipped bytes and its .sha256 deleted (a copy
    of ``*.pth`` only, an rsync filter, a tidy-up)."""
    monkeypatch.chdir(tmp_path)
    path = Path("results/pretrain/method~cdgmae/seed~0/checkpoint.pth")
    init_random_encoder("vit_mini_patch8", 0, path, img_size=32)
    flip(path)
    digest_path(path).unlink()
    return path


def _propagate(checkpoint: Path, out: Path):
    from pipeline.propagation import run as propagation_run

    return propagation_run.run_propagation(checkpoint, "davis", out / "davis", out / "propagation", {"figures": 0})


@pytest.mark.parametrize(
    "reader",
    [
        pytest.param(lambda p, out: load_encoder(p), id="load_encoder"),
        pytest.param(lambda p, out: read_state_dict(p), id="read_state_dict"),
        pytest.param(lambda p, out: load_cdgmae_vit(p, 32), id="load_cdgmae_vit"),
        pytest.param(lambda p, out: _propagate(p, out), id="propagation"),
    ],
)
def test_our_checkpoint_without_its_digest_is_refused(tmp_path, monkeypatch, reader):
    """Never read as a foreign checkpoint: a file the workflow made must carry its digest."""
    path = _our_checkpoint_without_digest(tmp_path, monkeypatch)
    with pytest.raises(IntegrityError, match=f"{path}: no recorded content digest"):
        reader(path, tmp_path)
    assert not (tmp_path / "propagation" / "predictions").exists()


@pytest.mark.parametrize("where", [0.5, 0.97], ids=["tensor-record", "zip-directory"])
def test_a_damaged_external_checkpoint_is_named(encoder_checkpoint, where):
    """An external file has no digest to check, but its zip records have CRCs."""
    digest_path(encoder_checkpoint).unlink()
    flip(encoder_checkpoint, int(encoder_checkpoint.stat().st_size * where))
    with pytest.raises(IntegrityError, match=str(encoder_checkpoint)):
        load_encoder(encoder_checkpoint)


def test_resume_state_falls_back_to_the_previous_good_one(tmp_path, caplog):
    """The S-LDM and pretraining share this: a flipped last.pth is set aside, the previous state
    of the same job is used, with a warning; nothing intact of this job -> start over."""
    path = tmp_path / "state" / "last.pth"
    save_resume_state({"fingerprint": "job", "step": 1}, path)
    save_resume_state({"fingerprint": "job", "step": 2}, path)
    assert torch.load(previous_state_path(path), weights_only=True)["step"] == 1
    log = logging.getLogger("cdgmae.test")
    caplog.set_level("INFO", logger=log.name)
    assert load_resume_state(path, "job", log)["step"] == 2
    flip(path)
    assert load_resume_state(path, "job", log)["step"] == 1
    assert "failed verification" in caplog.text and "resuming from the previous good state" in caplog.text
    assert (path.parent / "last.pth.corrupt").exists() and not path.exists()  # kept, not deleted
    # a last.pth written for other inputs does not hide this job's previous state
    save_resume_state({"fingerprint": "job", "step": 3}, path)
    save_resume_state({"fingerprint": "other", "step": 1}, path)
    assert load_resume_state(path, "job", log)["step"] == 3
    flip(previous_state_path(path))
    assert load_resume_state(path, "job", log) is None


def test_flipped_last_pth_is_not_resumed_from(tmp_path, caplog):
    cell, settings = setup(epochs=3, checkpoint_every=1)
    full = train(cell, settings, dataset(), seed=0, output=tmp_path / "a.pth", state_dir=tmp_path / "sa")
    state_dir = tmp_path / "sa"
    assert torch.load(previous_state_path(state_dir / "last.pth"), weights_only=True)["epoch"] == 2
    flip(state_dir / "last.pth")
    caplog.set_level("INFO", logger="cdgmae.pretrain")
    again = train(cell, settings, dataset(), seed=0, output=tmp_path / "b.pth", state_dir=state_dir)
    assert "failed verification" in caplog.text and "resuming from the previous good state" in caplog.text
    assert "resuming from" in caplog.text and "epoch 2" in caplog.text  # only epoch 3 redone
    assert again["loss"] == full["loss"]  # the same curve, epoch 3 recomputed from the good state
    a, b = (torch.load(tmp_path / n, weights_only=True)["model"] for n in ("a.pth", "b.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    finished, curve = sha(checkpoint), pd.read_csv(log)
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
    assert sha(checkpoint) == finished and pd.read_csv(log).equals(curve)


class _Payload:
    """What a malicious checkpoint pickles: a call of os.system on load."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _rcg_load(path):
    from pipeline.sldm.rcg import load_checkpoint

    return load_checkpoint(path, "--ldm")


@pytest.mark.parametrize(
    "reader",
    [
        pytest.param(lambda p: load_encoder(p, external=True), id="load_encoder"),
        pytest.param(read_state_dict, id="read_state_dict"),
        pytest.param(_rcg_load, id="rcg-import"),
    ],
)
def test_a_pickle_with_code_is_refused_saying_so(tmp_path, reader):
    """Refused plainly, never with torch's advice to retry with weights_only=False."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Payload()}, path)
    with pytest.raises(Exception, match="refused: the file holds pickled code") as err:
        reader(path)
    assert "os.system" in str(err.value) or "posix.system" in str(err.value)
    assert "weights_only=False" not in str(err.value) and str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# the S-LDM folder carries a per-file digest manifest (issue 19)


def _sldm_folder(kind: str, out: Path) -> Path:
    """An S-LDM folder as the workflow writes it: trained by ``sldm train`` (tiny settings) or
    imported by ``sldm import-rcg`` (the random-weight RCG fixture)."""
    from pipeline import cli
    from tests.test_sldm import TINY, _args

    if kind == "trained":
        rng = np.random.default_rng(0)
        for c in range(2):
            folder = out.parent / "imagenet" / "train" / f"n0000000{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        settings = {**TINY, "steps": 2, "sample_every": 0, "checkpoint_every": 1}
        args = _args(out.parent / "imagenet", out.parent / "run", settings)
        args[args.index("--output") + 1] = str(out)
        cli.run("sldm", args)
    else:
        from tests.rcg_fixture import write_rcg_fixture

        paths = write_rcg_fixture(out.parent / "rcg-checkpoints")
        args = ["import-rcg", "--ldm", str(paths["ldm"]), "--encoder", str(paths["encoder"])]
        cli.run("sldm", [*args, "--ldm-config", str(paths["config"]), "--out", str(out)])
    return out


def _load_sldm(folder: Path, kind: str):
    from pipeline.views.generators import build_generator

    settings = {"model_path": str(folder), "steps": 1, "dtype": "float32"}
    if kind == "imported":
        return build_generator("rcg", {**settings, "guidance_scale": 1.0}, 32, "cpu")
    return build_generator("sldm", settings, 16, "cpu")


SLDM_KINDS = ["trained", "imported"]


@pytest.fixture(scope="module", params=SLDM_KINDS)
def sldm_folder(request, tmp_path_factory):
    """(kind, a pristine folder) made once per kind; tests work on copies."""
    return request.param, _sldm_folder(request.param, tmp_path_factory.mktemp(request.param) / "model")


def _copy_into(folder: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, dest))


def test_the_sldm_folder_lists_every_file_in_a_sha256sum_manifest(sldm_folder):
    from pipeline.io import FOLDER_DIGESTS

    kind, folder = sldm_folder
    listed = [line.split("  ", 1)[1] for line in (folder / FOLDER_DIGESTS).read_text().splitlines()]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted([*listed, FOLDER_DIGESTS]) == on_disk and "unet/diffusion_pytorch_model.safetensors" in listed
    if kind == "imported":
        assert "import_keymap.json" in listed  # written after save_sldm, recorded again
    check = subprocess.run(["sha256sum", "--quiet", "-c", FOLDER_DIGESTS], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("where", ["results", "external"])
@pytest.mark.parametrize(
    "damage",
    ["flipped-unet", "flipped-encoder", "unlisted-file", "deleted-listed-file", "no-manifest"],
)
def test_a_damaged_sldm_folder_is_named_when_loaded(sldm_folder, tmp_path, monkeypatch, caplog, where, damage):
    """Before: 16 flipped bytes in the UNet's weights loaded silently (different views, or 'non-finite
    after 8 regenerations'); a folder without its manifest is refused under results/ and read with a
    logged note elsewhere."""
    from pipeline.io import FOLDER_DIGESTS

    kind, pristine = sldm_folder
    monkeypatch.chdir(tmp_path)
    folder = _copy_into(pristine, Path("results/sldm/model") if where == "results" else tmp_path / "user" / "model")
    target = {
        "flipped-unet": folder / "unet" / "diffusion_pytorch_model.safetensors",
        "flipped-encoder": folder / "encoder.safetensors",
        "unlisted-file": folder / "notes.txt",
        "deleted-listed-file": folder / "unet" / "diffusion_pytorch_model.safetensors",
        "no-manifest": folder / FOLDER_DIGESTS,
    }[damage]
    if damage.startswith("flipped"):
        flip(target)
    elif damage == "unlisted-file":
        target.write_text("added later")
    else:
        target.unlink()
    caplog.set_level("INFO", logger="cdgmae.sldm")
    if damage == "no-manifest" and where == "external":
        assert _load_sldm(folder, kind).model_sha256  # a user's folder: read, saying so
        assert f"{folder}: external folder without {FOLDER_DIGESTS}" in caplog.text
        return
    expected = {
        "flipped-unet": f"{target}: content digest",
        "flipped-encoder": f"{target}: content digest",
        "unlisted-file": f"{target}: not listed in",
        "deleted-listed-file": f"{target}: listed in .* but missing",
        "no-manifest": f"{folder}: no digest manifest",
    }[damage]
    with pytest.raises(IntegrityError, match=expected):
        _load_sldm(folder, kind)


# ---------------------------------------------------------------------------------------------
# "last good" is good: a state is kept only if its weights and update size are healthy (issue 19)


def _huge_lr_at(module, bad_step: int, monkeypatch, lr: float = 1e3) -> None:
    """One step (``bad_step``) of ``module``'s schedule at a huge learning rate."""
    real = module.lr_at
    monkeypatch.setattr(module, "lr_at", lambda step, *a, **k: lr if step == bad_step else real(step, *a, **k))


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

    cell, settings = setup(epochs=3, checkpoint_every=1)  # 2 steps an epoch
    state_dir, last = tmp_path / "state", tmp_path / "state" / "last.pth"
    _huge_lr_at(engine, bad_step, monkeypatch)
    with pytest.raises(UnhealthyWeightsError, match=f"after the update of step {bad_step}: .*stopped before saving"):
        train(cell, settings, dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=state_dir)
    monkeypatch.undo()
    if kept_epoch is None:
        assert not last.exists()
    else:
        kept = torch.load(last, weights_only=True)
        assert kept["epoch"] == kept_epoch and _healthy(kept, initial_max=1.0)  # LayerNorm ones: init max 1
    history = train(cell, settings, dataset(), seed=0, output=tmp_path / "ck.pth", state_dir=state_dir)
    assert len(history["loss"]) == 6 and all(np.isfinite(history["loss"]))


def test_s_ldm_training_never_keeps_a_diverged_state_as_last_good(tmp_path, monkeypatch):
    """The same rule in S-LDM training: a huge-lr step right before a state save stops the run,
    keeping the state of the step before."""
    from pipeline.resume import UnhealthyWeightsError
    from pipeline.sldm import engine as sldm_engine
    from pipeline.sldm.train import resolve_sldm_settings, training_records
    from pipeline.sldm.train import train as train_sldm
    from tests.test_sldm import TINY

    rng = np.random.default_rng(0)
    for c in range(2):
        folder = tmp_path / "imagenet" / "train" / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    settings = resolve_sldm_settings({**TINY, "sample_every": 0})  # 6 steps, a state every 2
    records = training_records(tmp_path / "imagenet", None)
    paths = dict(output=tmp_path / "model", state_dir=tmp_path / "state")
    _huge_lr_at(sldm_engine, 3, monkeypatch)  # the update that makes step 4's state
    with pytest.raises(UnhealthyWeightsError, match="after the update of step 3: .*keeping .*last.pth \\(step 2\\)"):
        train_sldm(settings, records, seed=0, device="cpu", **paths)
    monkeypatch.undo()
    assert torch.load(tmp_path / "state" / "last.pth", weights_only=True)["step"] == 2
    assert not (tmp_path / "model").exists()
    history = train_sldm(settings, records, seed=0, device="cpu", **paths)
    assert len(history["loss"]) == 6 and all(np.isfinite(history["loss"]))


# ---------------------------------------------------------------------------------------------
# rejects.csv of CropMAE / SiamMAE pretraining: written whenever non-empty, counted for the job


def _bad_image_sources(method: str, root: Path, n_bad: int) -> tuple[dict, list[Path]]:
    """A tiny root for ``method`` with ``n_bad`` unreadable images among 16 readable ones."""
    from tests.test_pretrain import write_imagenet

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
    cell, settings = setup(epochs=2, anchors=1, num_workers=workers, samples_per_epoch=32, micro_batch=4)
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
    from tests.test_pretrain import write_imagenet

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
    cell, settings = setup(epochs=1, anchors=1, num_workers=2, samples_per_epoch=16, micro_batch=4)
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
    assert set(map(str, bad)) <= set(pd.read_csv(state_dir / "rejects.csv")["path"])
