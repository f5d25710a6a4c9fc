"""Checkpoints and resumable states are verified against their recorded content digests on every
read (issue 13); a pickle holding code is refused. Tiny: vit_mini_patch8 at 32 px."""

import logging
import os
from pathlib import Path

import pytest
import torch

from pipeline.io import IntegrityError, digest_path, recorded_digest
from pipeline.pretrain.checkpoints import init_random_encoder, load_encoder
from pipeline.pretrain.train import train
from pipeline.resume import load_resume_state, previous_state_path, save_resume_state
from pipeline.vit_checkpoints import load_cdgmae_vit, read_state_dict
from tests.support import bag_dataset, flip, pretrain_setup, sha256_hex

pytestmark = pytest.mark.fault  # every case here is a fault-injection case (pytest -m fault)


@pytest.fixture
def encoder_checkpoint(tmp_path):
    path = tmp_path / "random-init" / "checkpoint.pth"
    init_random_encoder("vit_mini_patch8", 0, path, img_size=32)
    return path


def test_a_flipped_checkpoint_is_an_error_naming_it_in_every_loader(encoder_checkpoint, tmp_path):
    from pipeline.propagation import run as propagation_run

    assert recorded_digest(encoder_checkpoint) == sha256_hex(encoder_checkpoint)  # recorded when written
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


class _Killed(BaseException):
    """A kill at one rename of a save (BaseException: no handler of the writer catches it)."""


def test_a_kill_at_any_rename_of_a_save_keeps_an_intact_state(tmp_path, monkeypatch, caplog):
    """Kill the third save of a state (step 3) at each of its renames in turn (files and digest
    records): the next run resumes from an intact state of the job (step 2, or 3 once the new
    last.pth is in place), never starts over; and a last.pth never exists without its digest record
    (what a watcher polling for the state may rely on)."""
    real_replace = os.replace
    log = logging.getLogger("cdgmae.test")
    caplog.set_level("INFO", logger=log.name)

    def save_killed_at(kill_at: int | None, folder: Path) -> tuple[Path, list[str]]:
        path = folder / "last.pth"
        save_resume_state({"fingerprint": "job", "step": 1}, path)
        save_resume_state({"fingerprint": "job", "step": 2}, path)
        renames: list[str] = []

        def replace(src, dst):
            if len(renames) == kill_at:
                raise _Killed
            renames.append(Path(dst).name)
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            save_resume_state({"fingerprint": "job", "step": 3}, path)
        except _Killed:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        return path, renames

    _, renames = save_killed_at(None, tmp_path / "whole")
    assert "last.pth" in renames and "previous.pth" in renames
    for kill_at in range(len(renames)):
        path, _ = save_killed_at(kill_at, tmp_path / f"killed{kill_at}")
        assert not path.exists() or recorded_digest(path) is not None, f"killed at {renames[kill_at]}"
        caplog.clear()
        state = load_resume_state(path, "job", log)
        assert state is not None and "failed verification" not in caplog.text, (renames[kill_at], caplog.text)
        assert state["step"] == (3 if renames.index("last.pth") < kill_at else 2), renames[kill_at]


def test_flipped_last_pth_is_not_resumed_from(tmp_path, caplog):
    cell, settings = pretrain_setup(epochs=3, checkpoint_every=1)
    full = train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "a.pth", state_dir=tmp_path / "sa")
    state_dir = tmp_path / "sa"
    assert torch.load(previous_state_path(state_dir / "last.pth"), weights_only=True)["epoch"] == 2
    flip(state_dir / "last.pth")
    caplog.set_level("INFO", logger="cdgmae.pretrain")
    again = train(cell, settings, bag_dataset(), seed=0, output=tmp_path / "b.pth", state_dir=state_dir)
    assert "failed verification" in caplog.text and "resuming from the previous good state" in caplog.text
    assert "resuming from" in caplog.text and "epoch 2" in caplog.text  # only epoch 3 redone
    assert again["loss"] == full["loss"]  # the same curve, epoch 3 recomputed from the good state
    a, b = (torch.load(tmp_path / n, weights_only=True)["model"] for n in ("a.pth", "b.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)


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
