"""Every GPU path of the project once, in one command, with a table per section and a summary.

    bash bench/gpu_suite.sh            # on a GPU node: paper sizes, <= 8 minutes on one GPU
    bash bench/gpu_suite.sh --tiny     # anywhere: tiny sizes on the CPU (the tests run this)

Sections (each a subprocess, so each has its own peak-memory counter and a failure or a time-out
of one does not stop the others):

- ``pretrain``: ``bench.bench_pretrain`` — CrossViewMAE training steps (ViT-S/16, 224 px, bf16,
  a1 and a3) against the reference-style step in the same process: samples/s, peak memory;
- ``ddp``: one-GPU ``torchrun``: NCCL process group, the model DDP-wrapped, the pretraining step
  of ``pipeline.pretrain.engine_pretrain.train_one_step`` (gloo on the CPU);
- ``views``: view generation through ``pipeline.views.generators.build_generator`` with the tests'
  tiny random-weight ``sd-variation`` pipeline and ``sldm`` folder, fp16;
- ``sldm-train``: S-LDM training steps (``pipeline.sldm.train.build_loop`` + ``engine.train_step``);
- ``propagation``: label propagation at /8 (ViT-S/8) on one 480x854 DAVIS-sized synthetic
  sequence (``runner.encode_frames`` + ``algorithm.propagate``): frames/s, peak GPU memory.

``python -m bench.gpu_suite --section NAME [--tiny]`` runs one section in this process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny random-weight diffusion folders

from bench.bench_consistency import _peak_since, _start_peak
from bench.bench_pretrain import main as bench_pretrain_main
from bench.bench_propagation import _sequence_inputs
from pipeline.data.synthetic import make_davis
from pipeline.devices import set_threads
from pipeline.pretrain import engine_pretrain
from pipeline.pretrain.main_pretrain import build_model, resolve_cell, resolve_precision, resolve_pretrain_settings
from pipeline.pretrain.models_mae import build_encoder
from pipeline.propagation import algorithm as A
from pipeline.propagation import runner


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run of the suite: ``GPU`` (paper-like, <= 8 min) or ``TINY`` (CPU, seconds)."""

    device: str
    pretrain_args: tuple  # bench.bench_pretrain's arguments
    arch: str  # ddp step
    img_size: int
    batch: int
    steps: int
    view_batch: int  # images per generate() call, M views each
    view_count: int
    view_steps: int
    sldm: dict  # sldm settings overrides
    sldm_steps: int
    davis_hw: tuple
    davis_frames: int
    section_timeout: int  # seconds per section


GPU = Sizes(
    device="cuda",
    pretrain_args=(
        *("--arch", "vit_small_patch16", "--img-size", "224", "--batch", "64", "--steps", "10"),
        *("--precision", "bf16", "--cells", "1:0,3:0.25", "--device", "cuda"),
    ),
    arch="vit_small_patch16",
    img_size=224,
    batch=64,
    steps=10,
    view_batch=16,
    view_count=4,
    view_steps=25,
    sldm={"batch_size": 64},
    sldm_steps=20,
    davis_hw=(480, 854),
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
    batch=2,
    steps=1,
    view_batch=1,
    view_count=2,
    view_steps=2,
    sldm={
        "image_size": 16,
        "batch_size": 2,
        "unet": {
            "block_out_channels": [16, 32],
            "attention": [False, True],
            "layers_per_block": 1,
            "head_channels": 4,
            "cross_attention_dim": 16,
            "norm_num_groups": 8,
        },
        "encoder": {"input_size": 16, "kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}},
        "scheduler": {"num_train_timesteps": 100},
    },
    sldm_steps=1,
    davis_hw=(48, 88),
    davis_frames=3,
    section_timeout=120,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int, device: torch.device) -> tuple[float, float]:
    """(seconds per call over ``n`` calls after one warm-up call, peak MiB during them: CUDA max
    allocated, weights included — what must fit on the GPU; on the CPU the RSS growth)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _start_peak()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    seconds = (time.perf_counter() - t0) / n
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_since(before)
    return seconds, peak


def print_rows(rows: list[tuple]) -> None:
    print("| what | rate | peak MiB |\n|---|---|---|")
    for what, rate, peak in rows:
        print(f"| {what} | {rate} | {peak:.0f} |", flush=True)


# ------------------------------------------------------------------ in-process sections


def section_ddp(z: Sizes) -> None:
    """Under torchrun: a process group and the pretraining step on the DDP-wrapped model."""
    cuda = z.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        settings = resolve_pretrain_settings({"img_size": z.img_size, "precision": "bf16" if cuda else "fp32"})
        cell = resolve_cell({"method": "cdgmae", "arch": z.arch, "anchors": 3, "anchor_mask": 0.25}, settings)
        amp = resolve_precision(settings["precision"], device)
        model, optimizer, scaler = build_model(cell, settings, 0, device, 1e-4, amp)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        loop = engine_pretrain.Loop(
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
        views = torch.randn(z.batch, 4, 3, z.img_size, z.img_size, device=device)
        batches = iter(lambda: views, None)
        step = iter(range(1 << 30))
        seconds, peak = timed(
            lambda: engine_pretrain.train_one_step(loop, batches, next(step), 0, "none"), z.steps, device
        )
        print(f"# ddp: {dist.get_backend()} world {dist.get_world_size()}, {z.arch} {z.img_size}px a3, batch {z.batch}")
        print_rows([(f"DDP pretraining step ({settings['precision']})", f"{z.batch / seconds:.1f} samples/s", peak)])
    finally:
        dist.destroy_process_group()


def section_views(z: Sizes) -> None:
    """Tiny random-weight sd-variation and sldm folders, generated through the stage's generators."""
    # diffusers-based: imported here, so that the other sections' processes start faster
    from test_generators import build_tiny_sd_variation, build_tiny_sldm

    from pipeline.views.generators import build_generator

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
            seconds, peak = timed(lambda gen=gen: gen.generate(images, seeds), 1, device)
            n = z.view_batch * z.view_count
            rows.append(
                (f"{name} (tiny, {gen.dtype}, {z.view_steps} DDIM steps, CFG)", f"{n / seconds:.1f} views/s", peak)
            )
    print(f"# views: batch {z.view_batch} x {z.view_count} views, 32 px, {device}")
    print_rows(rows)


def section_sldm_train(z: Sizes) -> None:
    from pipeline.sldm import engine as sldm_engine
    from pipeline.sldm.train import build_loop, resolve_sldm_settings

    device = torch.device(z.device)
    settings = resolve_sldm_settings({**z.sldm, "steps": z.sldm_steps + 1})
    loop = build_loop(settings, 0, device)
    s, b = settings["image_size"], settings["batch_size"]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (b, s, s, 3), dtype=np.uint8))
    step = iter(range(1 << 30))
    seconds, peak = timed(lambda: sldm_engine.train_step(loop, images, next(step)), z.sldm_steps, device)
    print(f"# sldm-train: {s} px, batch {b}, autoencoder {settings['autoencoder']}, {device}")
    print_rows([("S-LDM training step", f"{b / seconds:.1f} images/s", peak)])


def section_propagation(z: Sizes) -> None:
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
                feats = runner.encode_frames(encoder, frames, 5, device)
                return A.propagate(feats, labels0, grid, topk=7, temperature=0.7, radius=20, queue=20)

            with torch.inference_mode():
                seconds, peak = timed(run, 1, device)
            rows.append(
                (
                    f"/8 {seq} {h}x{w}, grid {grid[0]}x{grid[1]}, {len(frames)} frames",
                    f"{len(frames) / seconds:.1f} frames/s",
                    peak,
                )
            )
    print(f"# propagation: ViT-S/8 (random init), queue 20, top-k 7, radius 20, {device}")
    print_rows(rows)


SECTIONS = {
    "ddp": section_ddp,
    "views": section_views,
    "sldm-train": section_sldm_train,
    "propagation": section_propagation,
}
ORDER = ("pretrain", "ddp", "views", "sldm-train", "propagation")
SUITE_BUDGET_S = 480  # the whole suite on one GPU: a section past it is reported as not run


# ------------------------------------------------------------------ the driver


def section_command(name: str, tiny: bool) -> list[str]:
    z = TINY if tiny else GPU
    if name == "pretrain":
        return [sys.executable, "-m", "bench.bench_pretrain", *z.pretrain_args]
    own = ["-m", "bench.gpu_suite", "--section", name] + (["--tiny"] if tiny else [])
    if name == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *own]
    return [sys.executable, *own]


def run_section(name: str, tiny: bool, timeout: float, env: dict) -> str:
    """Run one section; its status. On the GPU each section is a subprocess (its own CUDA peak
    counter; a crash or a hang does not stop the suite). With ``--tiny`` the sections run in this
    process (one interpreter start instead of five: the CPU run is what the tests time), except
    ``ddp``, which needs the ``torchrun`` launcher."""
    if tiny and name != "ddp":
        try:
            if name == "pretrain":
                bench_pretrain_main(list(TINY.pretrain_args))
            else:
                SECTIONS[name](TINY)
        except Exception as err:  # noqa: BLE001 - reported in the summary, the suite goes on
            print(f"{name} failed: {type(err).__name__}: {err}", flush=True)
            return f"failed ({type(err).__name__})"
        return "ok"
    # a session of its own: on a time-out the whole group goes (torchrun's worker too, which
    # would otherwise keep the GPU)
    proc = subprocess.Popen(section_command(name, tiny), cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out ({timeout:.0f} s)"
    return "ok" if rc == 0 else f"failed (exit {rc})"


def run_suite(names, tiny: bool) -> int:
    """Run the sections within ``SUITE_BUDGET_S``, print the summary table; the failures."""
    z = TINY if tiny else GPU
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if tiny:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    summary, start = [], time.perf_counter()
    for name in names:
        left = SUITE_BUDGET_S - (time.perf_counter() - start)
        if left < 10:
            summary.append((name, "not run (suite budget spent)", 0.0))
            continue
        print(f"\n## {name}\n", flush=True)
        t0 = time.perf_counter()
        status = run_section(name, tiny, min(z.section_timeout, left), env)
        summary.append((name, status, time.perf_counter() - t0))
    print(f"\n## summary ({'tiny, CPU' if tiny else 'GPU'}): {time.perf_counter() - start:.0f} s in all\n")
    print("| section | status | wall s |\n|---|---|---|")
    for name, status, seconds in summary:
        print(f"| {name} | {status} | {seconds:.1f} |")
    return sum(status != "ok" for _, status, _ in summary)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (seconds; what the tests run)")
    ap.add_argument("--section", choices=sorted(SECTIONS), help="run one in-process section (the driver's child)")
    ap.add_argument("--only", nargs="+", choices=ORDER, default=list(ORDER), help="sections to run (default: all)")
    args = ap.parse_args(argv)
    if args.section:
        set_threads(1 if args.tiny else None)
        SECTIONS[args.section](TINY if args.tiny else GPU)
        return
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device visible; use --tiny for the CPU run")
    sys.exit(1 if run_suite(args.only, args.tiny) else 0)


if __name__ == "__main__":
    main()
