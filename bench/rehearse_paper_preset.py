"""Rehearse ``presets/paper.yaml`` at its true sizes on the CPU: its own code paths, one or two steps
each, on a handful of synthetic images, before any GPU-day is spent on it.

    python -m bench.rehearse_paper_preset [--steps 1] [--sampling-steps 50] [--bag-steps 2]
        [--batch 2] [--threads 2] [--utilisation 0.4] [--stages ...] [--work DIR] [--tiny]

Stages (each in its own process, so that its peak RSS, ``bench.common.process_peak_mib``, is its own), all on
the preset as resolved (``config.yaml`` then ``presets/paper.yaml``, schema defaults filled), with
only the data paths, the step counts and the batch changed:

- ``data``: synthetic ImageNet (320-px stills), videos, one 480x854 DAVIS sequence of 3 frames; a
  random-weight AutoencoderKL with Stable Diffusion's f8 config (``sd-vae-ft-ema``'s), saved as a
  diffusers folder; a random-weight DINO ViT-B/16 (``vit_base_patch16_224.dino``) checkpoint;
- ``sldm-train``: ``pipeline.sldm.train.train`` on them: the 256-px S-LDM (the preset's UNet,
  4 x 32 x 32 latents of that autoencoder, DINO conditioning), ``--steps`` steps at ``--batch``,
  its resumable state and ``sldm`` folder written;
- ``sldm-sample``: the views stage's ``sldm`` generator loads that folder (diffusers layout) and
  samples one view of one image: ``--sampling-steps`` (default 50) guided DDIM steps, CFG 6;
- ``bag``: ``python -m pipeline.views generate`` + ``merge`` (vds) on two images, M = 4 views,
  ``--bag-steps`` DDIM steps (the sampler's cost is the row above; this one rehearses the writer);
- ``pretrain-*``: ``pipeline.pretrain.train.train`` for each Table 5 cell of the preset
  (CropMAE, SiamMAE, CDG-MAE a1, a3): ViT-S/16 at 224 px, ``--steps`` steps at ``--batch``;
- ``propagation-16`` / ``-8``: ``pipeline.propagation.run.run_propagation`` of a random-init
  ViT-S/16 and ViT-S/8 on the DAVIS sequence at 480 x 880 (the preset's protocol), scored.

Printed per stage: parameters, wall time, peak RSS, FLOPs per sample (``FlopCounterMode``: 2 per
multiply-add, convolutions, matmuls and attention, the CPU attention kernel included; forward +
backward for training) and the GPU-hours the preset's full workload implies on one A100 (312 dense
bf16 TFLOP/s) and one H100 SXM (989) at ``--utilisation`` of peak. FLOPs are counted on the CPU in
fp32; a GPU runs the same count in bf16. ``--tiny`` shrinks every size (the test of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, process_peak_mib

A100_TFLOPS = 312.0  # dense bf16
H100_TFLOPS = 989.0  # SXM, dense bf16
IMAGENET_TRAIN = 1_281_167
K400_TRAIN_VIDEOS = 240_000  # about: SiamMAE's epoch is one frame pair per video
DAVIS_VAL_FRAMES = 1_999
PRETRAIN_STAGES = ("pretrain-cropmae", "pretrain-siammae", "pretrain-cdgmae-a1", "pretrain-cdgmae-a3")
STAGES = ("data", "sldm-train", "sldm-sample", "bag", *PRETRAIN_STAGES, "propagation-16", "propagation-8")
ROW = "ROW "  # a stage's result line on stdout: ROW {json}

# --tiny: every size shrunk (the same code paths, seconds on one core)
TINY = {
    "sldm": {
        "image_size": 32,
        "unet": {
            "block_out_channels": [32, 64],
            "attention": [False, True],
            "layers_per_block": 1,
            "head_channels": 8,
            "cross_attention_dim": 32,
            "norm_num_groups": 8,
        },
        "encoder": {"input_size": 32, "kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}},
    },
    "views": {"image_size": 32},
    "pretrain": {"img_size": 48, "cell_defaults": {"arch": "vit_mini_patch4"}},
    "propagation": {"davis": {"size": [48, 88]}},
}
SIZES = {  # data and model sizes: the preset's, or --tiny's
    False: {"still": 320, "video_hw": (256, 320), "davis_hw": (480, 854), "vae": [128, 256, 512, 512], "vae_size": 256,
            "prop_archs": {"propagation-16": "vit_small_patch16", "propagation-8": "vit_small_patch8"}, "prop_img": 224},
    True: {"still": 40, "video_hw": (40, 48), "davis_hw": (48, 88), "vae": [32, 32], "vae_size": 32,
           "prop_archs": {"propagation-16": "vit_mini_patch8", "propagation-8": "vit_mini_patch4"}, "prop_img": 48},
}  # fmt: skip


# ------------------------------------------------------------------ helpers


def preset(tiny: bool) -> dict:
    """The paper preset as a run resolves it (``--tiny``: with every size shrunk)."""
    from pipeline.config import deep_update, load_config

    cfg = load_config(ROOT / "config.yaml", ROOT / "presets" / "paper.yaml")
    return deep_update(cfg, TINY) if tiny else cfg


def peak_rss_gib() -> float:
    return process_peak_mib() / 1024


@contextlib.contextmanager
def count_flops():
    """``FlopCounterMode`` (2 FLOPs per multiply-add) that also counts the CPU attention kernel
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward, absent from torch's table)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(
            q, k, v
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        yield counter


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


EMITTED: list[dict] = []  # the rows of the stages run in this process


def emit(stage: str, **row) -> None:
    EMITTED.append({"stage": stage, "peak_rss_gib": peak_rss_gib(), **row})
    print(ROW + json.dumps(EMITTED[-1]), flush=True)


@contextlib.contextmanager
def patched(owner, name: str, wrapper):
    """``owner.name`` replaced by ``wrapper(original)`` for the duration (restored after)."""
    original = getattr(owner, name)
    setattr(owner, name, wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def gpu_hours(total_flops: float, utilisation: float) -> tuple[float, float]:
    per = [total_flops / (utilisation * tf * 1e12) / 3600 for tf in (A100_TFLOPS, H100_TFLOPS)]
    return per[0], per[1]


def sd_vae_f8(blocks: list[int], sample_size: int):
    """A random-weight AutoencoderKL with Stable Diffusion's f8 config (sd-vae-ft-ema's
    config.json: 128/256/512/512 channels, 2 layers per block, 4 latent channels, scaling 0.18215)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks),
        block_out_channels=blocks,
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def paths(work: Path) -> dict:
    return {
        "imagenet": work / "imagenet",
        "videos": work / "videos",
        "davis": work / "davis",
        "vae": work / "sd-vae-ft-ema",
        "dino": work / "dino_vitbase16_pretrain.pth",
        "sldm": work / "sldm" / "model",
        "bag": work / "views" / "sldm" / "bag.h5",
    }


# ------------------------------------------------------------------ stages (one process each)


def stage_data(args, cfg: dict, work: Path) -> None:
    import torch

    from pipeline.data.synthetic import make_davis, make_imagenet, make_videos
    from pipeline.sldm.conditioning import timm_vit

    z, p, t0 = SIZES[args.tiny], paths(work), time.perf_counter()
    make_imagenet(p["imagenet"], {"classes": 2, "images_per_class": 2, "size": z["still"]}, 0)
    h, w = z["video_hw"]
    make_videos(p["videos"], {"count": 2, "frames": 8, "height": h, "width": w}, 0)
    h, w = z["davis_hw"]
    make_davis(p["davis"], {"sequences": 1, "frames": 3, "height": h, "width": w, "max_objects": 3}, 0)
    torch.manual_seed(0)
    vae = sd_vae_f8(z["vae"], z["vae_size"])
    vae.save_pretrained(p["vae"])
    enc = cfg["sldm"]["encoder"]
    vit = timm_vit(enc["timm_name"], {"img_size": enc["input_size"], **enc["kwargs"]})
    torch.save(vit.state_dict(), p["dino"])  # DINO's pretrain checkpoints are plain state dicts
    emit(
        "data",
        what=f"synthetic ImageNet 4 x {z['still']}², videos, DAVIS 1 x 3 frames {h}x{w}; "
        f"random AutoencoderKL (SD f8 config), random {enc['timm_name']}",
        params=n_params(vae) + n_params(vit),
        wall_s=time.perf_counter() - t0,
    )


def stage_sldm_train(args, cfg: dict, work: Path) -> None:
    from pipeline.sldm import engine
    from pipeline.sldm import train as train_mod

    p = paths(work)
    s = cfg["sldm"]
    settings = train_mod.resolve_sldm_settings(
        {
            **s,
            "autoencoder": str(p["vae"]),
            "encoder": {**s["encoder"], "checkpoint": str(p["dino"])},
            "steps": args.steps,
            "batch_size": args.batch,
            "max_images": None,
            "sample_every": 0,
            "checkpoint_every": args.steps,
            "num_workers": 0,
            "gpus": 1,
            "samples": {"images": 1, "views": 1, "ddim_steps": 1, "guidance_scale": s["samples"]["guidance_scale"]},
        }
    )
    seen, flops = {}, []

    def capture(build_loop):
        def wrapper(*a, **kw):
            seen["loop"] = build_loop(*a, **kw)
            return seen["loop"]

        return wrapper

    def counted(train_step):  # the first step under the FLOP counter
        def wrapper(loop, images, step):
            if flops:
                return train_step(loop, images, step)
            t = time.perf_counter()
            with count_flops() as c:
                out = train_step(loop, images, step)
            flops.append((c.get_total_flops(), time.perf_counter() - t))
            return out

        return wrapper

    records = train_mod.training_records(p["imagenet"], None)
    shutil.rmtree(work / "sldm", ignore_errors=True)  # a kept state would be resumed, not trained
    t0 = time.perf_counter()
    with patched(train_mod, "build_loop", capture), patched(engine, "train_step", counted):
        history = train_mod.train(
            settings, records, seed=0, device="cpu", output=str(p["sldm"]), state_dir=str(work / "sldm" / "state")
        )
    loop = seen["loop"]
    uc = loop.model.unet.config
    per_image = flops[0][0] / args.batch
    total = per_image * s["steps"] * s["batch_size"]
    man = json.loads((p["sldm"] / "sldm.json").read_text())
    emit(
        "sldm-train",
        what=f"S-LDM {settings['image_size']} px, UNet {settings['unet']['block_out_channels']} on "
        f"{uc.in_channels}x{uc.sample_size}x{uc.sample_size} latents, {settings['encoder']['timm_name']}, {settings['prediction_type']}, "
        f"{args.steps} step(s) at batch {args.batch}, state + folder written",
        params=n_params(loop.model.unet, loop.model.projector, loop.vae, loop.encoder.model),
        params_detail=f"UNet {n_params(loop.model.unet) / 1e6:.1f} M, VAE {n_params(loop.vae) / 1e6:.1f} M, "
        f"encoder {n_params(loop.encoder.model) / 1e6:.1f} M",
        wall_s=time.perf_counter() - t0,
        step_s=flops[0][1],
        loss=history["loss"][-1],
        gflops_per_sample=per_image / 1e9,
        workload=f"{s['steps']:,} steps x {s['batch_size']} images",
        gpu_hours=gpu_hours(total, args.utilisation),
        scheduler=man["scheduler"],
    )


def _first_images(root: Path, n: int, size: int):
    import numpy as np

    from pipeline.data.readers import list_imagenet
    from pipeline.imaging import load_square

    return np.stack([load_square(r.path, size) for r in list_imagenet(root, "train")[:n]])


def stage_sldm_sample(args, cfg: dict, work: Path) -> None:
    import numpy as np

    from pipeline.views.generators import build_generator

    p = paths(work)
    g_steps = cfg["views"]["generators"]["sldm"]["steps"]
    g = {**cfg["views"]["generators"]["sldm"], "model_path": str(p["sldm"]), "steps": args.sampling_steps}
    size = cfg["views"]["image_size"]
    t0 = time.perf_counter()
    gen = build_generator("sldm", g, size, "cpu")
    load_s = time.perf_counter() - t0
    images = _first_images(p["imagenet"], 1, size)
    t = time.perf_counter()
    with count_flops() as c:
        views = gen.generate(images, np.zeros((1, 1), np.int64))
    sample_s = time.perf_counter() - t
    if views.shape != (1, 1, size, size, 3) or not np.isfinite(views).all():
        raise RuntimeError(f"views of shape {views.shape}, finite {np.isfinite(views).all()}")
    per_view = c.get_total_flops()
    # the workload at the preset's steps (scaled from fewer --sampling-steps: UNet-dominated)
    full = per_view * g_steps / args.sampling_steps
    total = full * IMAGENET_TRAIN * cfg["views"]["n_views"]
    d = gen.describe()["sampler"]
    emit(
        "sldm-sample",
        what=f"views generator on the saved folder: 1 view of a {size}² image, {args.sampling_steps} DDIM steps, "
        f"CFG {d['guidance_scale']}, {d['prediction_type']}, dtype {g['dtype']} ({d['dtype']} on CPU)",
        params=n_params(gen.unet, gen.vae, gen.encoder, gen.projector),
        wall_s=time.perf_counter() - t0,
        load_s=load_s,
        step_s=sample_s,
        gflops_per_sample=per_view / 1e9,
        workload=f"{IMAGENET_TRAIN:,} images x {cfg['views']['n_views']} views x {g_steps} steps",
        gpu_hours=gpu_hours(total, args.utilisation),
    )


def stage_bag(args, cfg: dict, work: Path) -> None:
    import h5py

    from pipeline import cli

    p, v = paths(work), cfg["views"]
    shard_keys = ("n_views", "part_size", "image_size", "jpeg_quality", "max_reject_fraction")
    gen = {**v["generators"]["sldm"], "model_path": str(p["sldm"]), "steps": args.bag_steps}
    settings = {**{k: v[k] for k in shard_keys}, "shards": 1, "max_images": 2, "generators": {"sldm": gen}}
    shard = p["bag"].parent / "shard-0.h5"
    shutil.rmtree(p["bag"].parent, ignore_errors=True)  # complete parts would be kept, not generated
    t0 = time.perf_counter()
    argv = ["--root", str(p["imagenet"]), "--generator", "sldm", "--shard", "0", "--out", str(shard)]
    argv += ["--state-dir", str(p["bag"].parent / "parts"), "--settings", json.dumps(settings), "--seed", "0"]
    cli.run("views", ["generate", *argv, "--threads", str(args.threads)])
    merge = {k: val for k, val in v.items() if k not in ("generator", "generators", "figure_images")}
    merge.update(shards=1, max_images=2)
    cli.run("views", ["merge", "--shards", str(shard), "--out", str(p["bag"]), "--root", str(p["imagenet"])]
            + ["--settings", json.dumps(merge)])  # fmt: skip
    with h5py.File(p["bag"], "r") as f:
        rows, kind = int(f.attrs.get("expected_rows", 0)), "vds" if f["views"].is_virtual else "copy"
    emit(
        "bag",
        what=f"views generate + merge ({kind}): {rows} images x {v['n_views']} views at {v['image_size']}², "
        f"{args.bag_steps} DDIM steps",
        wall_s=time.perf_counter() - t0,
    )


def stage_pretrain(args, cfg: dict, work: Path, stage: str) -> None:
    import torch

    from pipeline.pretrain import flops as flops_mod
    from pipeline.pretrain import train as mp
    from pipeline.pretrain.strategies import build_dataset

    p = paths(work)
    b = args.batch
    settings = mp.resolve_pretrain_settings(
        {**cfg["pretrain"], "batch_size": b, "micro_batch": b, "samples_per_epoch": b, "num_workers": 0}
    )
    cells = {
        "pretrain-cropmae": {"method": "cropmae"},
        "pretrain-siammae": {"method": "siammae"},
        "pretrain-cdgmae-a1": {"anchors": 1, "anchor_mask": 0.0},
        "pretrain-cdgmae-a3": {"anchors": 3, "anchor_mask": 0.25},
    }
    table5 = [c for c in cfg["tables"]["table5"]["cells"] if all(c.get(k) == v for k, v in cells[stage].items())]
    cell = mp.resolve_cell({**table5[0], "epochs": args.steps}, settings)
    dataset = build_dataset(cell, settings, seed=0, bag=str(p["bag"]), imagenet_root=p["imagenet"],
                            videos_root=p["videos"])  # fmt: skip
    seen = {}

    def capture(build_model):
        def wrapper(*a, **kw):
            seen["model"] = build_model(*a, **kw)
            return seen["model"]

        return wrapper

    shutil.rmtree(work / f"{stage}-state", ignore_errors=True)  # a kept state would be resumed
    t0 = time.perf_counter()
    with patched(mp, "build_model", capture), count_flops() as c:
        history = mp.train(cell, settings, dataset, seed=0, output=work / f"{stage}.pth",
                           state_dir=work / f"{stage}-state", device="cpu")  # fmt: skip
    wall = time.perf_counter() - t0
    model = seen["model"][0]
    per_sample = c.get_total_flops() / (b * args.steps)
    img = settings["img_size"]
    views = torch.randn(1, 1 + cell["anchors"], 3, img, img)
    gmacs = flops_mod.gmacs_fvcore(model.train(), views, cell["target_mask"], cell["anchor_mask"])
    samples = K400_TRAIN_VIDEOS if cell["method"] == "siammae" else IMAGENET_TRAIN
    epochs = cfg["pretrain"]["cell_defaults"]["epochs"]
    emit(
        stage,
        what=f"{cell['method']} {cell['arch']} {img} px, N={cell['anchors']} r_a={cell['anchor_mask']} "
        f"r_t={cell['target_mask']}, {args.steps} step(s) at batch {b} (fwd GMACs, Table 8 convention: {gmacs:.2f})",
        params=n_params(model),
        wall_s=wall,
        step_s=sum(b / r for r in history["samples_per_s"]) / len(history["samples_per_s"]),
        loss=history["loss"][-1],
        gflops_per_sample=per_sample / 1e9,
        fwd_gmacs=gmacs,
        workload=f"{epochs} epochs x {samples:,} samples",
        gpu_hours=gpu_hours(per_sample * samples * epochs, args.utilisation),
    )


def stage_propagation(args, cfg: dict, work: Path, stage: str) -> None:
    from pipeline.pretrain.checkpoints import init_random_encoder
    from pipeline.pretrain.models_mae import build_encoder
    from pipeline.propagation.run import run_propagation

    z, p = SIZES[args.tiny], paths(work)
    arch = z["prop_archs"][stage]
    ckpt = work / f"random-{arch}.pth"
    init_random_encoder(arch, 0, ckpt, img_size=z["prop_img"])
    settings = json.loads(json.dumps(cfg["propagation"]))
    settings["davis"]["vallist"] = None
    out = work / stage
    shutil.rmtree(out, ignore_errors=True)  # complete predictions would be kept, not propagated
    t0 = time.perf_counter()
    with count_flops() as c:
        row = run_propagation(ckpt, "davis", p["davis"], out, settings=settings, device="cpu")
    wall = time.perf_counter() - t0
    frames = int(row["frames"])
    per_frame = c.get_total_flops() / frames
    emit(
        stage,
        what=f"random-init {arch} on DAVIS {z['davis_hw'][0]}x{z['davis_hw'][1]}, {frames} frames at "
        f"{settings['davis']['size'][0]}x{settings['davis']['size'][1]}, top-k {settings['davis']['topk']}, "
        f"queue {settings['queue']}, radius {settings['radius']}, scored (J&F {row['J&F-Mean']:.1f})",
        params=n_params(build_encoder(arch, z["prop_img"])),
        wall_s=wall,
        step_s=wall / frames,
        gflops_per_sample=per_frame / 1e9,
        workload=f"DAVIS-2017 val, {DAVIS_VAL_FRAMES:,} frames",
        gpu_hours=gpu_hours(per_frame * DAVIS_VAL_FRAMES, args.utilisation),
    )


def run_stage(args) -> None:
    cfg, work = preset(args.tiny), Path(args.work)
    if args.stage == "data":
        stage_data(args, cfg, work)
    elif args.stage == "sldm-train":
        stage_sldm_train(args, cfg, work)
    elif args.stage == "sldm-sample":
        stage_sldm_sample(args, cfg, work)
    elif args.stage == "bag":
        stage_bag(args, cfg, work)
    elif args.stage in PRETRAIN_STAGES:
        stage_pretrain(args, cfg, work, args.stage)
    else:
        stage_propagation(args, cfg, work, args.stage)


# ------------------------------------------------------------------ the driver


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0) / 2**20
    import torch

    return f"{os.cpu_count()}-core {cpu}, {mem:.0f} GiB RAM, torch {torch.__version__}, {platform.python_version()}"


def hours(h: float | None) -> str:
    """GPU-hours: whole hours from 10 up, two significant digits below."""
    return "" if h is None else format(h, ",.0f") if h >= 10 else format(h, ".2g")


def fmt_row(r: dict) -> str:
    if r.get("failed"):
        return f"| {r['stage']} | **failed**: {r['failed']} | | | | | | | |"
    a100, h100 = r.get("gpu_hours", (None, None))
    num = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
    params = num(r.get("params") and r["params"] / 1e6, ".1f")
    return (
        f"| {r['stage']} | {r['what']} | {params} | {r['wall_s']:.1f} | {num(r.get('step_s'), '.1f')} | "
        f"{r['peak_rss_gib']:.2f} | {num(r.get('gflops_per_sample'), ',.1f')} | {r.get('workload', '')} | "
        f"{hours(a100)} / {hours(h100)} |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps of S-LDM training and of each pretraining")
    ap.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps of the one view sampled (preset: 50)")
    ap.add_argument("--bag-steps", type=int, default=2, help="DDIM steps of the bag's 2 x 4 views (writer rehearsal)")
    ap.add_argument("--batch", type=int, default=2, help="images per training step (S-LDM and pretraining)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--utilisation", type=float, default=0.4, help="fraction of the GPUs' dense bf16 peak")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; the test of this script)")
    ap.add_argument(
        "--in-process", action="store_true", help="every stage in this process (faster; peak RSS then cumulative)"
    )
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # one stage, in this process
    args = ap.parse_args(argv)
    from pipeline.devices import set_threads
    from pipeline.runtime import setup_logging

    if args.stage or args.in_process:
        setup_logging()
        set_threads(args.threads)
    if args.stage:
        run_stage(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="rehearse-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# rehearsal of presets/paper.yaml{' (--tiny)' if args.tiny else ''}: {machine()}")
    print(f"# load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; work folder {work}")
    flags = ["--steps", str(args.steps), "--sampling-steps", str(args.sampling_steps), "--bag-steps",
             str(args.bag_steps), "--batch", str(args.batch), "--threads", str(args.threads), "--utilisation",
             str(args.utilisation), "--work", str(work)] + (["--tiny"] if args.tiny else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    rows, failed = [], 0
    for stage in args.stages:
        t0 = time.perf_counter()
        if args.in_process:
            done = len(EMITTED)
            run_stage(argparse.Namespace(**{**vars(args), "stage": stage, "work": str(work)}))
            rows += EMITTED[done:]
            print(f"# {stage}: {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        out = subprocess.run(
            [sys.executable, "-m", "bench.rehearse_paper_preset", "--stage", stage, *flags],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        found = [json.loads(ln[len(ROW) :]) for ln in out.stdout.splitlines() if ln.startswith(ROW)]
        if out.returncode or not found:
            failed += 1
            last = (out.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"## {stage} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
            found = [{"stage": stage, "failed": last[:200]}]
        rows += found
        print(f"# {stage}: {time.perf_counter() - t0:.0f} s", flush=True)
    u = f"{args.utilisation:.0%}"
    print(f"\n| stage | what ran (the preset's sizes) | params (M) | wall s | step s | peak RSS GiB | "
          f"GFLOPs / sample | paper-scale workload | GPU-h A100 / H100 @ {u} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(fmt_row(r))
    (work / "rows.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        if r.get("scheduler"):
            print(f"\n# S-LDM folder scheduler: {json.dumps(r['scheduler'])}")
    print(f"# load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
