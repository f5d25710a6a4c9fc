"""The S-LDM folder's integrity (issue 19): a sha256sum manifest of every file, checked when the
folder is loaded (trained here or imported from RCG), and a diverged S-LDM training step never
kept as the last good state."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io import IntegrityError
from tests.support import TINY_SLDM, flip, huge_lr_at, sldm_train_args

pytestmark = pytest.mark.fault  # every case here is a fault-injection case (pytest -m fault)


def _write_noise_imagenet(root: Path) -> None:
    """2 classes x 4 noise PNGs of 24 px in the ImageNet train layout."""
    rng = np.random.default_rng(0)
    for c in range(2):
        folder = root / "train" / f"n0000000{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


# ---------------------------------------------------------------------------------------------
# the S-LDM folder carries a per-file digest manifest (issue 19)


def _sldm_folder(kind: str, out: Path) -> Path:
    """An S-LDM folder as the workflow writes it: trained by ``sldm train`` (tiny settings) or
    imported by ``sldm import-rcg`` (the random-weight RCG fixture)."""
    from pipeline import cli

    if kind == "trained":
        _write_noise_imagenet(out.parent / "imagenet")
        settings = {**TINY_SLDM, "steps": 2, "sample_every": 0, "checkpoint_every": 1}
        args = sldm_train_args(out.parent / "imagenet", out.parent / "run", settings)
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


def test_s_ldm_training_never_keeps_a_diverged_state_as_last_good(tmp_path, monkeypatch):
    """The same rule in S-LDM training: a huge-lr step right before a state save stops the run,
    keeping the state of the step before."""
    from pipeline.resume import UnhealthyWeightsError
    from pipeline.sldm import engine as sldm_engine
    from pipeline.sldm.train import resolve_sldm_settings, training_records
    from pipeline.sldm.train import train as train_sldm

    _write_noise_imagenet(tmp_path / "imagenet")
    settings = resolve_sldm_settings({**TINY_SLDM, "sample_every": 0})  # 6 steps, a state every 2
    records = training_records(tmp_path / "imagenet", None)
    paths = dict(output=tmp_path / "model", state_dir=tmp_path / "state")
    huge_lr_at(sldm_engine, 3, monkeypatch)  # the update that makes step 4's state
    with pytest.raises(UnhealthyWeightsError, match="after the update of step 3: .*keeping .*last.pth \\(step 2\\)"):
        train_sldm(settings, records, seed=0, device="cpu", **paths)
    monkeypatch.undo()
    assert torch.load(tmp_path / "state" / "last.pth", weights_only=True)["step"] == 2
    assert not (tmp_path / "model").exists()
    history = train_sldm(settings, records, seed=0, device="cpu", **paths)
    assert len(history["loss"]) == 6 and all(np.isfinite(history["loss"]))
