"""Every GPU path of the project once, in one command: a table per section, a summary, and the
figures the README needs derived from paper-shaped rows.

    bash bench/gpu_suite.sh            # on a GPU node: paper shapes, <= 7 minutes on one GPU
    bash bench/gpu_suite.sh --tiny     # anywhere: tiny sizes on the CPU (the tests run this)

First the preflight (its own process on the GPU, so that the driver holds no CUDA context):
python, GPU, driver, torch / CUDA / cuDNN / NCCL and every library's version, and an import of
every module the chosen sections need. Then the sections, each a subprocess on the GPU (its own
peak-memory counters; a crash, a hang or a time-out of one does not stop the others):

- ``pretrain``: ``bench.bench_pretrain`` — CrossViewMAE training steps (ViT-S/16, 224 px, bf16,
  a1 and a3) against the reference-style step in the same process: samples/s, peak memory;
- ``loader``: the pretraining DataLoader (``pretrain.train.build_loader`` over
  ``strategies.build_dataset`` of a 256-px bag: HDF5 read + JPEG decode + augmentation) with the
  paper preset's workers (8) and micro-batch (256), a1 and a3: samples/s;
- ``ddp``: one-GPU ``torchrun``: NCCL process group, the model DDP-wrapped, the pretraining step of
  ``engine.train_one_step`` at the paper's micro-batch (256), a1 and a3: samples/s, peak
  memory allocated and reserved (gloo on the CPU);
- ``views``: view generation through ``pipeline.views.generators.build_generator`` with the tests'
  tiny random-weight ``sd-variation`` pipeline and ``sldm`` folder: the dtype they really ran in;
- ``sldm-train``: S-LDM training steps (``sldm.train.build_loop`` + ``engine.train_step``) at the
  paper preset's shapes (``presets/paper.yaml`` ``sldm:``: 256 px, a random-weight KL-f8
  autoencoder -> 4 x 32 x 32 latents, the preset's UNet, a random-init DINO ViT-B/16 condition),
  at the per-GPU batch (256 / 8 GPUs); the autoencoder's encode timed on its own too;
- ``sldm-sample``: the bag's sampling: that model written as an ``sldm`` folder, loaded by the views
  stage's generator and sampled at the preset's views settings (16 images x 4 views, 50 DDIM steps,
  CFG 6, the preset's dtype);
- ``propagation``: label propagation at /8 (ViT-S/8, random init) on one 480x880 DAVIS-sized
  synthetic sequence (``propagation_run.encode_frames`` + ``algorithm.propagate``): frames/s, peak memory.

From those rows: GPU-hours of the S-LDM (preset steps x per-GPU step time x GPUs), of the bag
(images x views x DDIM steps) and of a pretraining cell (epochs x images / min(step, loader) rate).
The log and the tables go to ``--out`` (``gpu_suite.log`` via the .sh, ``figures.md``,
``figures.json``).

``python -m bench.gpu_suite --section NAME [--tiny]`` runs one section in this process;
``--preflight`` the preflight alone. The module imports only the standard library, numpy and torch:
each section imports what it needs, so a missing package costs that section only.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, measure, print_table, print_table_header, print_table_row
from bench.device_wheels import SUITE_IMPORTS  # the standard library only
from tests.support import TINY_SLDM

PAPER_PRESET = ROOT / "presets" / "paper.yaml"
IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1K train: the preset's S-LDM data and bag
# the stable-diffusion KL-f8 autoencoder's architecture (sd-vae-ft-ema, the preset's sldm.autoencoder)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


@functools.cache
def paper() -> dict:
    """The paper preset (``presets/paper.yaml``) as a dict: the GPU sizes and the GPU-hour arithmetic
    follow it."""
    import yaml

    return yaml.safe_load(PAPER_PRESET.read_text())


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run of the suite: ``gpu_sizes()`` (the paper preset's shapes) or ``TINY``
    (CPU, seconds)."""

    device: str
    pretrain_args: tuple  # bench.bench_pretrain's arguments (the ours-vs-reference comparison)
    arch: str  # the pretraining cells' arch
    img_size: int
    micro_batch: int  # per-GPU micro-batch of the pretraining step and of the loader
    steps: int  # timed pretraining steps per cell
    loader_rows: int  # rows of the loader section's bag
    loader_size: int  # side of its stored images (views.image_size)
    loader_workers: int  # DataLoader workers (pretrain.num_workers)
    loader_batches: int  # timed batches per cell
    view_batch: int  # tiny views section: images per generate() call, M views each
    view_count: int
    view_steps: int
    sldm: dict  # the sldm section (before the suite's autoencoder / encoder overrides)
    sldm_gpus: int  # GPUs the preset's batch is spread over: the timed batch is batch_size / sldm_gpus
    sldm_steps: int  # timed training steps
    vae: dict  # AutoencoderKL kwargs of the random-weight autoencoder
    sample_batch: int  # views.batch_size
    sample_views: int  # views.n_views
    sample_steps: int  # DDIM steps
    sample_cfg: float
    sample_dtype: str
    sample_size: int  # views.image_size
    davis_hw: tuple
    davis_frames: int
    section_timeout: int  # seconds per section


def gpu_sizes() -> Sizes:
    """The GPU run: the paper preset's shapes (pretraining micro-batch, loader workers, S-LDM
    model and per-GPU batch, the bag's sampler), DAVIS at 480x880."""
    p = paper()
    pre, sl, views = p["pretrain"], p["sldm"], p["views"]
    gen = views["generators"]["sldm"]
    arch = pre["cell_defaults"]["arch"]
    return Sizes(
        device="cuda",
        pretrain_args=(
            *("--arch", arch, "--img-size", str(pre["img_size"]), "--batch", "64", "--steps", "10"),
            *("--precision", "bf16", "--cells", "1:0,3:0.25", "--device", "cuda"),
        ),
        arch=arch,
        img_size=pre["img_size"],
        micro_batch=pre["micro_batch"],
        steps=10,
        loader_rows=256,
        loader_size=views["image_size"],
        loader_workers=pre["num_workers"],
        loader_batches=16,
        view_batch=16,
        view_count=4,
        view_steps=25,
        sldm=sl,
        sldm_gpus=sl["gpus"],
        sldm_steps=10,
        vae=SD_VAE,
        sample_batch=views["batch_size"],
        sample_views=views["n_views"],
        sample_steps=gen["steps"],
        sample_cfg=gen["guidance_scale"],
        sample_dtype=gen.get("dtype", "bfloat16"),
        sample_size=views["image_size"],
        davis_hw=(480, 880),  # the paper's DAVIS input (a multiple of /8 and /16)
        davis_frames=50,
        section_timeout=150,  # seconds; the suite as a whole keeps to SUITE_BUDGET_S
    )


TINY = Sizes(
    device="cpu",
    pretrain_args=(
        *("--arch", "vit_mini_patch4", "--img-size", "16", "--batch", "2", "--steps", "1", "--warmup", "0"),
        *("--precision", "fp32", "--cells", "1:0,3:0.25", "--device", "cpu", "--threads", "1"),
    ),
    arch="vit_mini_patch4",
    img_size=16,
    micro_batch=2,
    steps=1,
    loader_rows=4,
    loader_size=24,
    loader_workers=1,
    loader_batches=2,
    view_batch=1,
    view_count=2,
    view_steps=2,
    sldm={
        "image_size": 16,
        "batch_size": 2,
        "steps": 10,
        # the S-LDM tests' tiny UNet, encoder and schedule, with a DINO encoder's name
        "unet": TINY_SLDM["unet"],
        "encoder": {**TINY_SLDM["encoder"], "timm_name": "vit_base_patch16_224.dino"},
        "scheduler": TINY_SLDM["scheduler"],
    },
    sldm_gpus=1,
    sldm_steps=1,
    vae={**SD_VAE, "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    | {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 16},
    sample_batch=1,
    sample_views=2,
    sample_steps=2,
    sample_cfg=6.0,
    sample_dtype="float32",
    sample_size=16,
    davis_hw=(48, 96),
    davis_frames=3,
    section_timeout=120,
)


def sizes(tiny: bool) -> Sizes:
    return TINY if tiny else gpu_sizes()


# ------------------------------------------------------------------ shape constraints


def vae_factor(vae: dict) -> int:
    return 2 ** (len(vae["block_out_channels"]) - 1)


def check_sizes(z: Sizes) -> list[str]:
    """Every constraint the sections' sizes must meet, as messages (none: the sizes run): inputs
    that are multiples of the patch sizes they are cut into, latents the UNet can halve at each
    level, head widths and group norms that divide the channels, batches that split as the preset
    splits them. Checked before anything is timed, and by the tests for GPU and TINY."""
    from pipeline.pretrain.models_mae import resolve_arch

    bad = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            bad.append(text)

    patch = resolve_arch(z.arch)["patch_size"]
    need(z.img_size % patch == 0, f"pretraining img_size {z.img_size} is not a multiple of {z.arch}'s patch {patch}")
    args = dict(zip(z.pretrain_args[::2], z.pretrain_args[1::2]))
    bench_patch = resolve_arch(args["--arch"])["patch_size"]
    need(int(args["--img-size"]) % bench_patch == 0, f"bench_pretrain --img-size {args['--img-size']} vs patch")
    for p in (8, 16):  # propagation at /8 (this suite) and /16 (the paper's ViT-S/16 rows)
        h, w = z.davis_hw
        need(h % p == 0 and w % p == 0, f"propagation input {h}x{w} is not a multiple of the /{p} patch")
    s, unet, enc = z.sldm, z.sldm["unet"], z.sldm["encoder"]
    factor = vae_factor(z.vae)
    need(
        s["image_size"] % factor == 0, f"sldm.image_size {s['image_size']} is not a multiple of the VAE factor {factor}"
    )
    latent = s["image_size"] // factor
    levels = len(unet["block_out_channels"])
    need(latent % 2 ** (levels - 1) == 0, f"latent side {latent} cannot be halved {levels - 1} times by the UNet")
    need(len(unet["attention"]) == levels, "sldm.unet.attention needs one flag per block_out_channels level")
    for c in unet["block_out_channels"]:
        need(
            c % unet["head_channels"] == 0, f"UNet channels {c} not a multiple of head_channels {unet['head_channels']}"
        )
        need(c % unet["norm_num_groups"] == 0, f"UNet channels {c} not a multiple of norm_num_groups")
    for c in z.vae["block_out_channels"]:
        need(c % z.vae["norm_num_groups"] == 0, f"VAE channels {c} not a multiple of its norm_num_groups")
    enc_patch = enc.get("kwargs", {}).get("patch_size", 16)
    need(
        enc.get("input_size", 224) % enc_patch == 0, f"sldm encoder input {enc.get('input_size')} vs patch {enc_patch}"
    )
    need(
        s["batch_size"] % z.sldm_gpus == 0, f"sldm.batch_size {s['batch_size']} does not split over {z.sldm_gpus} GPUs"
    )
    need(z.sample_size == s["image_size"], f"views.image_size {z.sample_size} != sldm.image_size {s['image_size']}")
    need(z.loader_size >= z.img_size // 2, f"loader bag images ({z.loader_size} px) far below img_size {z.img_size}")
    return bad


# ------------------------------------------------------------------ measuring and reporting


def timed(fn, n: int, device: torch.device, warmup: int = 1) -> tuple[float, float, float]:
    """(seconds per call over ``n`` calls after ``warmup`` calls, peak MiB allocated, peak MiB
    reserved during them; ``bench.common.measure``). CUDA: weights included (what must fit on the
    GPU; reserved is what the caching allocator holds). CPU: the peak RSS growth, for both."""
    for _ in range(warmup):
        fn()
    with measure(device, total=True) as m:
        for _ in range(n):
            fn()
    if device.type == "cuda":
        return m.seconds / n, m.peak_mib, m.reserved_mib
    return m.seconds / n, m.peak_mib, m.peak_mib


def print_rows(rows: list[tuple], device: torch.device) -> None:
    """| what | rate | s per call | peak MiB allocated | peak MiB reserved | (CPU: RSS growth)."""
    mem = ("peak MiB allocated", "peak MiB reserved") if device.type == "cuda" else ("peak RSS MiB", "-")
    print_table_header(["what", "rate", "s per call", *mem])
    for what, rate, seconds, alloc, reserved in rows:
        res = f"{reserved:.0f}" if device.type == "cuda" else "-"
        print_table_row([what, rate, f"{seconds:.4f}", f"{alloc:.0f}", res])


def record(key: str, value: float, note: str = "") -> None:
    """A figure for the driver's derived table (a JSON line in ``$GPU_SUITE_FIGURES``)."""
    path = os.environ.get("GPU_SUITE_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"key": key, "value": float(value), "note": note}) + "\n")


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``): a killed suite or
    torchrun leaves no section process holding the GPU."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------ preflight


def environment_rows() -> list[tuple[str, str]]:
    """Python, platform, GPU(s), driver, torch / CUDA / cuDNN / NCCL, threads."""
    rows = [("python", f"{platform.python_version()} ({sys.executable})"), ("platform", platform.platform())]
    nccl = "-"
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError, TypeError):
            pass
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows.append(("torch", f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {cudnn}, NCCL {nccl}"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (
                    f"GPU {i}",
                    f"{p.name}, {p.total_memory / 2**20:,.0f} MiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs",
                )
            )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            rows.append(("driver", smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "nvidia-smi failed"))
        except (OSError, subprocess.TimeoutExpired, IndexError):
            rows.append(("driver", "nvidia-smi not found"))
        rows.append(
            ("TF32", f"matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}")
        )
    else:
        rows.append(("GPU", "none visible: a CPU run"))
    rows.append(("CPUs", f"{len(os.sched_getaffinity(0))} usable, torch threads {torch.get_num_threads()}"))
    rows.append(("PYTHONPATH", os.environ.get("PYTHONPATH", "") or "-"))
    rows.append(("TQDM_DISABLE", os.environ.get("TQDM_DISABLE", "-")))
    return rows


SECTION_MODULES = {
    "pretrain": ["bench.bench_pretrain"],
    "loader": ["bench.bench_loader", "pipeline.pretrain.train", "pipeline.pretrain.strategies"],
    "ddp": ["torch.distributed.run", "pipeline.pretrain.train", "pipeline.pretrain.engine"],
    "views": ["tests.support", "pipeline.views.generators"],
    "sldm-train": ["diffusers", "pipeline.sldm.train", "pipeline.sldm.engine", "pipeline.sldm.model"],
    "sldm-sample": ["pipeline.sldm.train", "pipeline.views.generators"],
    "propagation": ["bench.bench_propagation", "pipeline.data.synthetic", "pipeline.propagation.run"],
}


def preflight(names) -> int:
    """Print the environment and each library's version; import every module the sections
    ``names`` need. Returns the number of failed imports."""
    from importlib import metadata

    print("| | |\n|---|---|")
    for key, value in environment_rows():
        print(f"| {key} | {value} |")
    print("\n| module | distribution | version | from | import |\n|---|---|---|---|---|")
    failed = 0
    modules = dict.fromkeys([*SUITE_IMPORTS, *(m for n in names for m in SECTION_MODULES.get(n, []))])
    for module in modules:
        dist = SUITE_IMPORTS.get(module, "")
        try:
            version = metadata.version(dist) if dist else ""
        except metadata.PackageNotFoundError:
            version = "not installed"
        try:
            mod = importlib.import_module(module)
            where, status = str(Path(getattr(mod, "__file__", "") or "?").parent), "ok"
        except Exception as err:  # noqa: BLE001 - every failure is reported, the suite goes on
            where, status = "-", f"FAILED: {type(err).__name__}: {err}".replace("|", "/")[:300]
            failed += 1
        print(f"| {module} | {dist} | {version} | {where} | {status} |", flush=True)
    return failed


# ------------------------------------------------------------------ sections


def section_pretrain(z: Sizes) -> None:
    from bench.bench_pretrain import main as bench_pretrain_main

    bench_pretrain_main(list(z.pretrain_args))


def _paper_pretrain_settings(z: Sizes) -> dict:
    from pipeline.pretrain.train import resolve_pretrain_settings

    keep = {k: v for k, v in paper()["pretrain"].items() if k not in ("cell_defaults", "seeds", "gpus")}
    cuda = z.device == "cuda"
    over = dict(img_size=z.img_size, micro_batch=z.micro_batch, batch_size=z.micro_batch, num_workers=z.loader_workers)
    return resolve_pretrain_settings({**keep, **over, "precision": keep.get("precision", "auto") if cuda else "fp32"})


CELLS = ((1, 0.0), (3, 0.25))  # a1 and a3 (Table 4's cells)


def section_loader(z: Sizes) -> None:
    """The pretraining DataLoader alone: batches of the real training path (bag read, JPEG decode
    of the used images, crops, flip, normalization, collation, pinned copies on CUDA)."""
    from bench.bench_loader import write_bench_bag
    from pipeline.pretrain.strategies import build_dataset
    from pipeline.pretrain.train import build_loader

    device = torch.device(z.device)
    settings = _paper_pretrain_settings(z)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bag = write_bench_bag(Path(tmp) / "bag.h5", z.loader_rows, z.loader_size)
        # drain what the workers prefetch (2 batches each) before timing: the rate is the steady one
        warm = 2 * z.loader_workers + 2
        for anchors, anchor_mask in CELLS:
            cell = {"method": "cdgmae", "anchors": anchors, "anchor_mask": anchor_mask, "target": "either"}
            ds = build_dataset(cell, settings, seed=0, bag=str(bag))
            loader = build_loader(
                ds, settings, device, steps_per_epoch=warm + z.loader_batches + 1, seed=0, world_size=1, rank=0
            )
            batches = iter(loader)
            for _ in range(warm):
                next(batches)
            with measure(device) as m:
                for _ in range(z.loader_batches):
                    next(batches).to(device, non_blocking=True)
            seconds = m.seconds / z.loader_batches
            rate = z.micro_batch / seconds
            del batches, loader
            record(f"loader.a{anchors}.samples_s", rate, f"{z.loader_workers} workers")
            rows.append((f"a{anchors} loader, {z.loader_workers} workers, batch {z.micro_batch}", rate, seconds))
    print(
        f"# loader: build_loader(build_dataset(cdgmae, target either)) over a {z.loader_rows}-row bag of "
        f"{z.loader_size}-px JPEGs -> {z.img_size} px, {device}, {len(os.sched_getaffinity(0))} CPUs"
    )
    print_table(
        ["what", "samples/s", "s per batch", "samples/s per worker"],
        [
            [what, f"{rate:.0f}", f"{seconds:.4f}", f"{rate / max(z.loader_workers, 1):.0f}"]
            for what, rate, seconds in rows
        ],
    )


def section_ddp(z: Sizes) -> None:
    """Under torchrun: a process group and the pretraining step on the DDP-wrapped model, at the
    paper's micro-batch, a1 and a3."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.pretrain import engine
    from pipeline.pretrain.train import build_model, resolve_cell, resolve_precision

    die_with_parent()  # torchrun's worker: gone if torchrun is killed
    cuda = z.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as pretrain.train.wrap_ddp
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        settings = _paper_pretrain_settings(z)
        amp = resolve_precision(settings["precision"], device)
        rows = []
        for anchors, anchor_mask in CELLS:
            cell = resolve_cell(
                {"method": "cdgmae", "arch": z.arch, "anchors": anchors, "anchor_mask": anchor_mask}, settings
            )
            model, optimizer, scaler = build_model(cell, settings, 0, device, 1e-4, amp)
            ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
            loop = engine.Loop(
                model=model,
                ddp_model=ddp,
                optimizer=optimizer,
                scaler=scaler,
                autocast=torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False),
                device=device,
                cell=cell,
                settings=settings,
                seed=0,
                accum=1,
                steps_per_epoch=100,
                peak_lr=1e-4,
                world_size=dist.get_world_size(),
                rank=dist.get_rank(),
            )
            views = torch.randn(z.micro_batch, 1 + anchors, 3, z.img_size, z.img_size, device=device)
            batches = iter(lambda views=views: views, None)
            step = iter(range(1 << 30))
            seconds, alloc, reserved = timed(
                lambda loop=loop, batches=batches, step=step: engine.train_one_step(
                    loop, batches, next(step), 0, "none"
                ),
                z.steps,
                device,
                warmup=2,
            )
            rate = z.micro_batch / seconds
            record(f"pretrain.a{anchors}.samples_s", rate, f"micro-batch {z.micro_batch}")
            record(f"pretrain.a{anchors}.reserved_mib", reserved)
            precision = str(amp).removeprefix("torch.") if amp else "fp32"
            what = f"a{anchors} (r_a {anchor_mask:g}) DDP step, micro-batch {z.micro_batch}, {precision}"
            rows.append((what, f"{rate:.1f} samples/s", seconds, alloc, reserved))
            del loop, ddp, model, optimizer, views
            if cuda:
                torch.cuda.empty_cache()
        print(f"# ddp: {dist.get_backend()} world {dist.get_world_size()}, {z.arch} {z.img_size}px, {device}")
        print_rows(rows, device)
    finally:
        dist.destroy_process_group()


def _module_dtype(module) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def section_views(z: Sizes) -> None:
    """Tiny random-weight sd-variation and sldm folders, generated through the stage's generators;
    the dtype each UNet's weights really are in, beside the dtype asked for."""
    from pipeline.views.generators import build_generator
    from tests.support import build_tiny_sd_variation, build_tiny_sldm

    device = torch.device(z.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (z.view_batch, 32, 32, 3), dtype=np.uint8)
    seeds = rng.integers(0, 1 << 31, (z.view_batch, z.view_count), dtype=np.int64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "sd-variation": build_tiny_sd_variation(Path(tmp) / "sdv"),
            "sldm": build_tiny_sldm(Path(tmp) / "sldm"),
        }
        for name, folder in folders.items():
            settings = {"model_path": str(folder), "steps": z.view_steps, "guidance_scale": 6.0, "dtype": "float16"}
            gen = build_generator(name, settings, image_size=32, device=z.device)
            unet = gen.pipe.unet if hasattr(gen, "pipe") else gen.unet
            ran, recorded = _module_dtype(unet), str(gen.dtype).removeprefix("torch.")
            if ran != recorded:
                raise AssertionError(f"{name}: the UNet runs in {ran} but the generator records {recorded}")
            seconds, alloc, reserved = timed(lambda gen=gen: gen.generate(images, seeds), 1, device)
            n = z.view_batch * z.view_count
            what = f"{name} (tiny, asked float16, ran {ran}, {z.view_steps} DDIM steps, CFG)"
            rows.append((what, f"{n / seconds:.1f} views/s", seconds, alloc, reserved))
    print(f"# views: batch {z.view_batch} x {z.view_count} views, 32 px, {device}")
    print_rows(rows, device)


def _paper_sldm(z: Sizes, folder: Path) -> dict:
    """The resolved sldm settings of the suite: the preset's section (or TINY's), its autoencoder a
    random-weight AutoencoderKL of ``z.vae`` written to ``folder``, its encoder the same timm
    architecture with random weights, the batch the per-GPU share of the preset's."""
    from diffusers import AutoencoderKL

    from pipeline.sldm.train import resolve_sldm_settings

    torch.manual_seed(0)
    AutoencoderKL(**z.vae).save_pretrained(folder)
    s = json.loads(json.dumps(z.sldm))  # a copy
    s["autoencoder"] = str(folder)
    s["encoder"] = {**s.get("encoder", {}), "source": "random-init", "checkpoint": None}
    s["batch_size"] = s["batch_size"] // z.sldm_gpus
    s["num_workers"] = 0
    if z.device != "cuda":
        s["precision"] = "fp32"
    return resolve_sldm_settings(s)


def _params_m(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.3g}"


def section_sldm_train(z: Sizes) -> None:
    from pipeline.sldm import engine as sldm_engine
    from pipeline.sldm.model import to_model_space
    from pipeline.sldm.train import build_loop

    device = torch.device(z.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as tmp:
        settings = _paper_sldm(z, Path(tmp) / "vae")
        loop = build_loop(settings, 0, device)
    s, b = settings["image_size"], settings["batch_size"]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (b, s, s, 3), dtype=np.uint8))
    step = iter(range(1 << 30))
    seconds, alloc, reserved = timed(
        lambda: sldm_engine.train_step(loop, images, next(step)), z.sldm_steps, device, warmup=2
    )
    x = images.permute(0, 3, 1, 2).to(device).float() / 127.5 - 1.0
    gen = torch.Generator().manual_seed(0)
    with loop.autocast:  # where train_step encodes: to_model_space decides the precision
        latents = to_model_space(loop.vae, x, gen)
        enc_seconds, _, _ = timed(lambda: to_model_space(loop.vae, x, gen), z.sldm_steps, device)
    precision = "bf16 autocast" if device.type == "cuda" and settings["precision"] != "fp32" else "fp32"
    record("sldm.step_s", seconds, f"batch {b} per GPU")
    record("sldm.encode_s", enc_seconds)
    record("sldm.reserved_mib", reserved)
    unet = loop.model.unet
    print(
        f"# sldm-train: {s} px, batch {b} per GPU ({settings['batch_size'] * z.sldm_gpus} on {z.sldm_gpus}), "
        f"latents {tuple(latents.shape[1:])} ({latents.dtype}), UNet {_params_m(unet)} M params "
        f"{settings['unet']['block_out_channels']} heads of {settings['unet']['head_channels']}, "
        f"VAE {_params_m(loop.vae)} M, encoder {loop.encoder.timm_name} {_params_m(loop.encoder.model)} M "
        f"(random init), {precision}, {device}"
    )
    rows = [
        ("S-LDM training step", f"{b / seconds:.1f} images/s", seconds, alloc, reserved),
        ("of which: autoencoder encode", f"{b / enc_seconds:.1f} images/s", enc_seconds, 0.0, 0.0),
    ]
    print_rows(rows, device)


def section_sldm_sample(z: Sizes) -> None:
    """The bag's sampling cost: the paper-shaped model as an ``sldm`` folder, sampled by the views
    stage's generator at the preset's views settings."""
    from pipeline.sldm.train import build_loop, write_folder
    from pipeline.views.generators import build_generator

    device = torch.device(z.device)
    with tempfile.TemporaryDirectory() as tmp:
        settings = _paper_sldm(z, Path(tmp) / "vae")
        loop = build_loop(settings, 0, torch.device("cpu"))  # only written out
        folder = write_folder(loop, Path(tmp) / "sldm", n_images=0, step=0)
        del loop
        gen_settings = {
            "model_path": str(folder),
            "steps": z.sample_steps,
            "guidance_scale": z.sample_cfg,
            "eta": 0.0,
            "dtype": z.sample_dtype,
        }
        gen = build_generator("sldm", gen_settings, image_size=z.sample_size, device=z.device)
    rng = np.random.default_rng(0)
    B, M = z.sample_batch, z.sample_views
    images = rng.integers(0, 256, (B, z.sample_size, z.sample_size, 3), dtype=np.uint8)
    seeds = rng.integers(0, 1 << 31, (B, M), dtype=np.int64)
    seconds, alloc, reserved = timed(lambda: gen.generate(images, seeds), 2 if device.type == "cuda" else 1, device)
    ran = _module_dtype(gen.unet)
    record("sample.batch_s", seconds, f"{B} images x {M} views, {z.sample_steps} DDIM steps, CFG {z.sample_cfg}")
    record("sample.reserved_mib", reserved)
    print(
        f"# sldm-sample: {B} images x {M} views, {z.sample_size} px, DDIM {z.sample_steps} steps, CFG "
        f"{z.sample_cfg:g} (2 UNet passes per step), UNet ran in {ran} (asked {z.sample_dtype}), VAE decode "
        f"{_module_dtype(gen.vae)}, {device}"
    )
    per_view = seconds / (B * M)
    print_rows([("guided sampling, one batch", f"{B * M / seconds:.2f} views/s", seconds, alloc, reserved)], device)
    print(f"per view: {per_view:.3f} s; per view and DDIM step: {per_view / z.sample_steps * 1e3:.2f} ms")


def section_propagation(z: Sizes) -> None:
    from bench.bench_propagation import _sequence_inputs
    from pipeline.data.synthetic import make_davis
    from pipeline.pretrain.models_mae import build_encoder
    from pipeline.propagation import algorithm as A
    from pipeline.propagation import run as propagation_run

    device = torch.device(z.device)
    torch.manual_seed(0)
    encoder = build_encoder("vit_small_patch8", 224).to(device).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "davis"
        h, w = z.davis_hw
        make_davis(root, dict(sequences=1, frames=z.davis_frames, height=h, width=w, max_objects=3), 0)
        for seq, frames, ids in _sequence_inputs(root, z.davis_hw):
            grid = A.grid_size(z.davis_hw, 8)
            label_set = np.unique(ids).tolist()
            labels0 = torch.from_numpy(A.segmentation_labels(ids, label_set, grid)).reshape(-1, len(label_set))

            def run(frames=frames, labels0=labels0, grid=grid):
                feats = propagation_run.encode_frames(encoder, frames, 5, device)
                return A.propagate(feats, labels0, grid, topk=7, temperature=0.7, radius=20, queue=20)

            with torch.inference_mode():
                seconds, alloc, reserved = timed(run, 1, device)
            record("propagation.frames_s", len(frames) / seconds)
            what = f"/8 {seq} {h}x{w}, grid {grid[0]}x{grid[1]}, {len(frames)} frames"
            rows.append((what, f"{len(frames) / seconds:.1f} frames/s", seconds, alloc, reserved))
    print(f"# propagation: ViT-S/8 (random init), queue 20, top-k 7, radius 20, {device}")
    print_rows(rows, device)


SECTIONS = {
    "pretrain": section_pretrain,
    "loader": section_loader,
    "ddp": section_ddp,
    "views": section_views,
    "sldm-train": section_sldm_train,
    "sldm-sample": section_sldm_sample,
    "propagation": section_propagation,
}
ORDER = tuple(SECTIONS)
SUITE_BUDGET_S = 420  # the whole suite on one GPU: a section past it is reported as not run
SECTION_TIMEOUT_S = {"sldm-sample": 180}  # its folder (~2 GB) is written and read back first


# ------------------------------------------------------------------ derived figures


def derive(figures: dict[str, float], tiny: bool) -> list[tuple[str, str, str]]:
    """(figure, value, from) rows: the GPU-hours the README quotes, from the sections' rows."""
    p, z = paper(), sizes(tiny)
    rows = []
    sl, views = p["sldm"], p["views"]
    if "sldm.step_s" in figures:
        s, gpus, steps = figures["sldm.step_s"], sl["gpus"], sl["steps"]
        hours = steps * s * gpus / 3600
        rows.append(
            (
                f"S-LDM training: {steps:,} steps x batch {sl['batch_size']} on {gpus} GPUs",
                f"{hours:,.1f} GPU-hours ({hours / gpus:,.1f} h on {gpus} GPUs)",
                f"sldm-train: {s:.4f} s per step at {z.sldm['batch_size'] // z.sldm_gpus} images per GPU "
                f"(DDP all-reduce and data loading not included)",
            )
        )
    if "sample.batch_s" in figures:
        per_view = figures["sample.batch_s"] / (z.sample_batch * z.sample_views)
        n_views, steps = views["n_views"], views["generators"]["sldm"]["steps"]
        per_step = per_view / z.sample_steps  # the run's own steps (TINY runs fewer)
        hours = IMAGENET_TRAIN_IMAGES * n_views * steps * per_step / 3600
        rows.append(
            (
                f"bag: {IMAGENET_TRAIN_IMAGES:,} images x {n_views} views x {steps} DDIM steps "
                f"(CFG {views['generators']['sldm']['guidance_scale']:g})",
                f"{hours:,.1f} GPU-hours ({hours / views['shards']:,.1f} h per shard, {views['shards']} shards)",
                f"sldm-sample: {per_step * 1e3:.3f} ms per view and DDIM step",
            )
        )
    epochs = p["pretrain"]["cell_defaults"]["epochs"]
    for anchors, _ in CELLS:
        step, load = figures.get(f"pretrain.a{anchors}.samples_s"), figures.get(f"loader.a{anchors}.samples_s")
        if step is None or load is None:
            continue
        rate = min(step, load)
        hours = epochs * IMAGENET_TRAIN_IMAGES / rate / 3600
        bound = "the loader" if load < step else "the GPU step"
        reserved = figures.get(f"pretrain.a{anchors}.reserved_mib", 0.0)
        rows.append(
            (
                f"pretraining a{anchors}: {epochs} epochs x {IMAGENET_TRAIN_IMAGES:,} samples, one GPU",
                f"{hours:,.1f} GPU-hours per cell and seed",
                f"min(step {step:,.0f}, loader {load:,.0f} samples/s): bound by {bound}; "
                f"{reserved:,.0f} MiB reserved at micro-batch {z.micro_batch}",
            )
        )
    return rows


def read_figures(path: Path) -> dict[str, float]:
    figures = {}
    if path.exists():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            figures[item["key"]] = item["value"]
    return figures


# ------------------------------------------------------------------ the driver

_RUNNING: set = set()  # section processes in flight (killed with their group on TERM / INT / HUP)


def _kill_sections(signum, frame) -> None:
    for proc in list(_RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"gpu_suite: {signal.Signals(signum).name}: running sections killed", flush=True)
    os._exit(128 + signum)


def section_command(name: str, tiny: bool) -> list[str]:
    z = sizes(tiny)
    if name == "pretrain":
        return [sys.executable, "-u", "-m", "bench.bench_pretrain", *z.pretrain_args]
    own = ["-m", "bench.gpu_suite", "--section", name] + (["--tiny"] if tiny else [])
    if name == "ddp":
        return [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *own]
    return [sys.executable, "-u", *own]


def run_section(name: str, tiny: bool, timeout: float, env: dict) -> str:
    """Run one section; its status. On the GPU each section is a subprocess (its own CUDA peak
    counters; a crash or a hang does not stop the suite). With ``--tiny`` the sections run in this
    process (one interpreter start instead of seven: the CPU run is what the tests time), except
    ``ddp``, which needs the ``torchrun`` launcher."""
    if tiny and name != "ddp":
        try:
            SECTIONS[name](TINY)
        except Exception as err:  # noqa: BLE001 - reported in the summary, the suite goes on
            print(f"{name} failed: {type(err).__name__}: {err}", flush=True)
            return f"failed ({type(err).__name__})"
        return "ok"
    # a session of its own: on a time-out the whole group goes (torchrun's worker too, which would
    # otherwise keep the GPU); and it dies with this process (PR_SET_PDEATHSIG) if this one is killed
    proc = subprocess.Popen(
        section_command(name, tiny), cwd=ROOT, env=env, start_new_session=True, preexec_fn=die_with_parent
    )
    _RUNNING.add(proc)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out ({timeout:.0f} s)"
    finally:
        _RUNNING.discard(proc)
    return "ok" if rc == 0 else f"failed (exit {rc})"


def run_suite(names, tiny: bool, out: Path | None = None, preflight: tuple[str, float] | None = None) -> int:
    """Run the sections within ``SUITE_BUDGET_S``, print the summary and the derived figures
    (written to ``out`` as figures.md / figures.json when given); the number of failures."""
    z = sizes(tiny)
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / "figures.jsonl"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
            "GPU_SUITE_FIGURES": str(figures_path),
        }
        if tiny:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        saved = os.environ.get("GPU_SUITE_FIGURES")
        os.environ["GPU_SUITE_FIGURES"] = str(figures_path)  # the in-process (tiny) sections
        summary, start = [], time.perf_counter()
        if preflight is not None:
            summary.append(("preflight", *preflight))
        try:
            for name in names:
                left = SUITE_BUDGET_S - (time.perf_counter() - start)
                if left < 10:
                    summary.append((name, "not run (suite budget spent)", 0.0))
                    continue
                print(f"\n## {name}\n", flush=True)
                t0 = time.perf_counter()
                timeout = min(SECTION_TIMEOUT_S.get(name, z.section_timeout), left)
                status = run_section(name, tiny, timeout, env)
                summary.append((name, status, time.perf_counter() - t0))
        finally:
            if saved is None:
                os.environ.pop("GPU_SUITE_FIGURES", None)
            else:
                os.environ["GPU_SUITE_FIGURES"] = saved
        figures = read_figures(figures_path)
    lines = [f"## summary ({'tiny, CPU' if tiny else 'GPU'}): {time.perf_counter() - start:.0f} s in all", ""]
    lines += ["| section | status | wall s |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.1f} |" for name, status, seconds in summary]
    derived = derive(figures, tiny)
    lines += ["", "## derived figures" + (" (tiny CPU sizes: the arithmetic only, not paper figures)" if tiny else "")]
    lines += ["", "| figure | value | from |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in derived] or ["| (no paper-shaped rows finished) | | |"]
    print("\n" + "\n".join(lines), flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures.md").write_text("\n".join(lines) + "\n")
        doc = {
            "tiny": tiny,
            "environment": dict(environment_rows()),
            "summary": [dict(section=n, status=s, wall_s=round(t, 1)) for n, s, t in summary],
            "figures": figures,
            "derived": [dict(figure=a, value=b, source=c) for a, b, c in derived],
        }
        (out / "figures.json").write_text(json.dumps(doc, indent=1) + "\n")
    return sum(status != "ok" for _, status, _ in summary)


def run_preflight(names, tiny: bool) -> str:
    """The preflight: in this process with ``--tiny``, else in its own (no CUDA context here)."""
    print("## preflight\n", flush=True)
    if tiny:
        failed = preflight(names)
        return "ok" if failed == 0 else f"failed ({failed} imports)"
    cmd = [sys.executable, "-u", "-m", "bench.gpu_suite", "--preflight", "--only", *names]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, preexec_fn=die_with_parent)
    _RUNNING.add(proc)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timed out (120 s)"
    finally:
        _RUNNING.discard(proc)
    return "ok" if rc == 0 else f"failed ({rc} imports)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (seconds; what the tests run)")
    ap.add_argument("--section", choices=sorted(SECTIONS), help="run one in-process section (the driver's child)")
    ap.add_argument("--preflight", action="store_true", help="environment, versions and imports only")
    ap.add_argument("--only", nargs="+", choices=ORDER, default=list(ORDER), help="sections to run (default: all)")
    ap.add_argument("--out", type=Path, help="folder for figures.md / figures.json (gpu_suite.sh: $OUT)")
    args = ap.parse_args(argv)
    if args.section:
        from pipeline.devices import set_threads

        die_with_parent()
        set_threads(1 if args.tiny else None)
        SECTIONS[args.section](sizes(args.tiny))
        return
    if args.preflight:
        sys.exit(min(preflight(args.only), 100))
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device visible; use --tiny for the CPU run")
    bad = check_sizes(sizes(args.tiny))
    if bad:
        raise SystemExit("gpu_suite: sizes that cannot run:\n  " + "\n  ".join(bad))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _kill_sections)
    t0 = time.perf_counter()
    status = run_preflight(args.only, args.tiny)
    failed = run_suite(args.only, args.tiny, args.out, preflight=(status, time.perf_counter() - t0))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
