"""Helpers shared by the test modules (and by ``bench/``, which builds the tests' tiny diffusion
folders): the one place for every helper, constant and writer more than one test module uses. Test
modules import this module, never each other; fixtures live in ``tests/conftest.py``.

``HANG_GUARD_S``: the only time limit a test may set on a subprocess or a wait loop. It exists to end
a hung test, never to judge speed: no test may depend on how fast a loaded machine is, so every wait
is for an event (a file, a line, an exit) and this bound is far beyond any run on a loaded 2-core
machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HANG_GUARD_S = 3 * 3600
ROOT = Path(__file__).resolve().parent.parent


def wait_until(event: Callable[[], bool], poll_s: float = 0.01) -> bool:
    """Poll ``event()`` until it holds (True) or ``HANG_GUARD_S`` has passed (False): the one wait
    loop of the tests, for an event, never for a time."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not event():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


# ---------------------------------------------------------------------------------------------
# the workflow in a private copy: snakemake runs, dry-run job counts, code edits

# what a copy of the workflow needs to run (never results/: a test must not see the checkout's runs)
WORKFLOW_FILES = [
    "Snakefile",
    "rules",
    "pipeline",
    "schemas",
    "config.yaml",
    "envs",
    "profiles",
    "report",
    "presets",
    "tests/configs",
]
# `=` form: --configfile takes several values and would swallow the target that follows
TINY_CONFIG = ["--configfile=tests/configs/tiny.yaml"]
TABLE4 = "results/table4.csv"


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = HANG_GUARD_S
) -> subprocess.CompletedProcess:
    """``python -m snakemake ARGS`` in ``workdir`` (its own copy of the package on PYTHONPATH)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(workdir)}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table: {rule: count} (empty when nothing is to be done)."""
    counts: dict[str, int] = {}
    if "Job stats:" not in output:
        return counts
    block = output.split("Job stats:", 1)[1]
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def copy_workflow(dest: Path) -> Path:
    """A private copy of the workflow's code and configs in ``dest`` (no results)."""
    for item in WORKFLOW_FILES:
        src = ROOT / item
        target = dest / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    return dest


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a finished run that a test may edit, kill or scrub: symlinks and modification
    times kept, so Snakemake sees the same up-to-date state as in ``run``."""
    return Path(shutil.copytree(run, dest, symlinks=True))


def dry_table4(work: Path, *extra: str) -> tuple[dict[str, int], str]:
    """The tiny config's Table 4 dry-run: (job counts, Snakemake's output)."""
    proc = snakemake(work, "-n", "--cores", "2", *TINY_CONFIG, *extra, TABLE4)
    return job_counts(proc.stdout + proc.stderr), proc.stdout + proc.stderr


def edit(path: Path, change: str = "\n_EDITED_BY_TEST_WORKFLOW = True\n", old: str | None = None):
    """Change a source file (by default a new statement: a change of what Python executes; with
    ``old``, replace that text by ``change``); return a function restoring the original."""
    original = path.read_text()
    if old is None:
        path.write_text(original + change)
    else:
        assert original.count(old) == 1, f"{old!r} must occur once in {path}"
        path.write_text(original.replace(old, change))

    def restore():
        path.write_text(original)

    return restore


# ---------------------------------------------------------------------------------------------
# damaged files, diverging training


def sha256_hex(path) -> str:
    """The SHA-256 of a file's bytes, computed here (not by the code under test)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def huge_lr_at(module, bad_step: int, monkeypatch, lr: float = 1e3) -> None:
    """One step (``bad_step``) of ``module``'s schedule at a huge learning rate."""
    real = module.lr_at
    monkeypatch.setattr(module, "lr_at", lambda step, *a, **k: lr if step == bad_step else real(step, *a, **k))


def flip(path: Path, offset: int | None = None, n: int = 16, keep_mtime: bool = False) -> None:
    """Invert ``n`` bytes of ``path`` in place (in the middle unless ``offset``); with
    ``keep_mtime``, bit rot that Snakemake's timestamps never see."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def write_bad_images(folder: Path) -> list[Path]:
    """A corrupt JPEG (a JPEG header, then noise) and a zero-byte file."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt, empty = folder / "corrupt.JPEG", folder / "empty.JPEG"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(300))
    empty.write_bytes(b"")
    return [corrupt, empty]


# ---------------------------------------------------------------------------------------------
# ImageNet-layout folders


def write_imagenet(root: Path, n=16) -> Path:
    """``n`` noise PNGs (40 x 48) in two classes of the ImageNet train layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"n{i % 2:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"img{i:02d}.png")
    return root


def write_imagenet_jpegs(root: Path, classes=3, per_class=4, size=(40, 56)) -> Path:
    """Noise JPEGs of growing heights (``size[0] + i``), ``per_class`` in each of ``classes``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = size[0] + i, size[1]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"n{c:08d}_{i}.JPEG", quality=90)
    return root


def write_coloured_imagenet(root: Path) -> Path:
    """3 classes x 4 images (24 px PNGs, class-coloured noise) in the ImageNet train layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "train" / f"n0000000{c}"
        d.mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 100, (24, 24, 3)).astype(np.uint8)
            img[..., c] += 150
            Image.fromarray(img).save(d / f"img{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# views: the stage's settings, a writer that stops, bags in its layout

VIEWS_SEED = 3


def views_settings(**kw) -> dict:
    """The views section's defaults under small test settings (``generators`` apart)."""
    from pipeline.config import section_defaults

    gens = kw.pop("generators", {})
    base = {
        **dict(
            n_views=3, shards=1, part_size=4, batch_size=2, image_size=24, jpeg_quality=90, max_reject_fraction=0.25
        ),
        **kw,
    }
    return section_defaults("views", overrides={**base, "generators": gens})


def stop_after_parts(max_parts: int) -> type:
    """A ``ShardWriter`` class whose job ends (``ShardStopped``) after writing ``max_parts`` parts."""
    from pipeline.views.generate import ShardWriter

    class StopAfterParts(ShardWriter):
        def write_part(self, *args, **kwargs):
            rejects = super().write_part(*args, **kwargs)
            if self.parts_written + 1 >= max_parts:
                self.stop.requested = "test"
            return rejects

    return StopAfterParts


def write_bag(path: Path, ids, size=40, M=4, seed=1) -> None:
    """A tiny merged bag in the views stage's HDF5 layout, through its own row writer."""
    import h5py

    from pipeline.io import record_digest
    from pipeline.views.hdf5 import encode_jpeg, write_rows

    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noqa: E731
    n = len(ids)
    with h5py.File(path, "w") as f:
        write_rows(
            f,
            [encode_jpeg(img(), 95) for _ in ids],
            [[encode_jpeg(img(), 95) for _ in range(M)] for _ in ids],
            list(ids),
            list(range(n)),
            [[0] * M] * n,
            M,
        )
        f.attrs.update(
            complete=True, expected_rows=n, generator="warp", is_baseline=True, n_views=M, settings=json.dumps({})
        )
    record_digest(path)  # as the views stage records it (the bag is verified on open)


def make_bag(imagenet_root, out_dir, generator, generators=None, image_size=32, n_views=2):
    """A merged bag of ``generator``'s views of an ImageNet-layout folder, through the views CLI."""
    from pipeline.cli import run

    s = {"shards": 1, "part_size": 8, "image_size": image_size, "n_views": n_views, "generators": generators or {}}
    shard = out_dir / generator / "shard-0.h5"
    args = ["--root", str(imagenet_root), "--generator", generator, "--shard", "0", "--out", str(shard)]
    run("views", ["generate", *args, "--settings", json.dumps(s)])
    bag = out_dir / generator / "bag.h5"
    run("views", ["merge", "--shards", str(shard), "--out", str(bag), "--settings", json.dumps(s)])
    return bag


def make_sldm_bag(imagenet_root, out_dir, encoder_source="random-init", **save_kwargs):
    """(bag, folder): a random-weight pixel-space S-LDM folder 'trained here' (sldm.json records
    ``training`` and the encoder's source), and the bag of its views (1 DDIM step, CFG 3)."""
    folder = build_tiny_sldm(
        out_dir / "sldm-model",
        pixel_space=True,
        encoder_source=encoder_source,
        **{"training": {"seed": 0, "steps": 1}, **save_kwargs},
    )
    gens = {"sldm": {"model_path": str(folder), "steps": 1, "eta": 0.5, "guidance_scale": 3.0, "dtype": "float32"}}
    return make_bag(imagenet_root, out_dir / "views", "sldm", gens), folder


# ---------------------------------------------------------------------------------------------
# pretraining: tiny settings, a tiny in-memory bag, the train command

PRETRAIN_SETTINGS = {
    "img_size": 32,
    "batch_size": 8,
    "micro_batch": 4,
    "base_lr": 1e-3,
    "warmup_epochs": 1,
    "num_workers": 0,
    "samples_per_epoch": 16,
}
# the model tests' tiny arch: 32 px / 8 -> 4x4 = 16 patches
TINY_MAE_ARCH = dict(
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_embed_dim=16,
    decoder_depth=2,
    decoder_num_heads=2,
    decoder_ff=64,
)


def tiny_bag(n=16, size=40, seed=0) -> list[dict]:
    """``n`` in-memory bag rows of noise (a real image and 4 views each)."""
    rng = np.random.default_rng(seed)
    img = lambda: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noqa: E731
    return [{"image_id": f"c/{i:03d}", "index": i, "real": img(), "views": [img() for _ in range(4)]} for i in range(n)]


def pretrain_setup(epochs=3, anchors=2, anchor_mask=0.25, **overrides):
    """(cell, settings) of a tiny vit_mini_patch8 cdgmae cell under ``PRETRAIN_SETTINGS``."""
    from pipeline.pretrain.train import resolve_cell, resolve_pretrain_settings

    settings = resolve_pretrain_settings({**PRETRAIN_SETTINGS, **overrides})
    cell = resolve_cell(
        {"arch": "vit_mini_patch8", "anchors": anchors, "anchor_mask": anchor_mask, "epochs": epochs}, settings
    )
    return cell, settings


def bag_dataset(cls=None, **kwargs):
    """A ``BagViewsDataset`` (or subclass ``cls``) over ``tiny_bag()`` with 2 anchors at 32 px."""
    from pipeline.pretrain.strategies import BagViewsDataset

    return (cls or BagViewsDataset)(tiny_bag(), img_size=32, anchors=2, target="either", seed=3, **kwargs)


def train_command(cell, settings, out, *sources, log_csv="train_log.csv") -> list[str]:
    """``python -m pipeline.pretrain train`` for one cell and seed 0 into ``out``."""
    return [
        *(sys.executable, "-m", "pipeline.pretrain", "train"),
        *("--cell", json.dumps(cell), "--seed", "0", "--settings", json.dumps(settings), *sources),
        *("--output", str(out / "checkpoint.pth"), "--state-dir", str(out / "state")),
        *("--log-csv", str(out / log_csv), "--threads", "1"),
    ]


# ---------------------------------------------------------------------------------------------
# the S-LDM: tiny training settings and the train command's arguments

TINY_SLDM = {
    "image_size": 16,
    "steps": 6,
    "batch_size": 4,
    "warmup_steps": 2,
    "checkpoint_every": 2,
    "sample_every": 3,
    "unet": {
        "block_out_channels": [16, 32],
        "attention": [False, True],
        "layers_per_block": 1,
        "head_channels": 4,
        "cross_attention_dim": 16,
        "norm_num_groups": 8,
    },
    "encoder": {"input_size": 16, "kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}},
    "samples": {"images": 2, "views": 2, "ddim_steps": 2},
    "scheduler": {"num_train_timesteps": 100},
}


def sldm_train_args(root, out, settings, seed=0) -> list[str]:
    """``python -m pipeline.sldm``'s arguments to train on ``root`` into ``out`` (CPU, 1 thread)."""
    return [
        "train",
        "--imagenet-root",
        str(root),
        "--settings",
        json.dumps(settings),
        "--seed",
        str(seed),
        "--output",
        str(out / "model"),
        "--state-dir",
        str(out / "state"),
        "--log-csv",
        str(out / "train_log.csv"),
        "--curve-png",
        str(out / "curve.png"),
        "--samples-png",
        str(out / "samples.png"),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]


# ---------------------------------------------------------------------------------------------
# tiny random-weight diffusion folders, saved and loaded like real weights


def tiny_unet(cross_attention_dim=32, channels=4, sample_size=16):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    # two blocks -> downsampling factor 2: 16-px latent <-> 32-px image
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def tiny_ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd_variation(folder):
    """A random-weight StableDiffusionImageVariationPipeline saved like the lambdalabs folder."""
    import torch
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=4,
        )
    )
    pipe = StableDiffusionImageVariationPipeline(
        vae=tiny_vae(),
        image_encoder=encoder,
        unet=tiny_unet(32),
        scheduler=tiny_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sldm(folder, pixel_space=False, **save_kwargs):
    """A random-weight S-LDM folder (tiny timm ViT encoder, Linear projector) via save_sldm; in
    pixel space (no VAE) the UNet denoises 24-px RGB images directly."""
    import timm
    import torch

    from pipeline.sldm.folder import save_sldm

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    projector = torch.nn.Linear(48, 32)
    unet = tiny_unet(32, channels=3, sample_size=24) if pixel_space else tiny_unet(32)
    vae = None if pixel_space else tiny_vae()
    return save_sldm(
        folder,
        unet,
        vae,
        tiny_ddim_scheduler(),
        encoder,
        "vit_tiny_patch16_224",
        projector,
        encoder_kwargs=kwargs,
        **save_kwargs,
    )


# ---------------------------------------------------------------------------------------------
# evaluation outputs, as the propagation stage writes them

EVAL_COLUMNS = {"davis": ("J&F-Mean", "J-Mean", "F-Mean"), "vip": ("mIoU",), "jhmdb": ("PCK@0.1", "PCK@0.2")}


def write_eval(root, model, davis, vip, jhmdb) -> list[str]:
    """results/eval/<model>/<dataset>/metrics.csv under ``root`` for the three datasets."""
    import pandas as pd

    files = []
    for ds, vals in (("davis", (davis, davis - 1, davis + 1)), ("vip", (vip,)), ("jhmdb", (jhmdb, jhmdb + 20))):
        p = root / "results" / "eval" / model / ds / "metrics.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([dict(zip(EVAL_COLUMNS[ds], vals))]).to_csv(p, index=False)
        files.append(str(p))
    return files
