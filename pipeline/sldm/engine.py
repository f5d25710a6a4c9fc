"""The S-LDM training loop: one optimizer step, the resumable state, the loss history and its
outputs (``train_log.csv``, the loss curve, the sample grid).

Every step is a function of (seed, step): the lr is set from the step index before the update, and
every random draw of the step (flip, timesteps, condition drops, noise, VAE latent sample) comes
from a CPU generator seeded from (seed, step, rank), so a resumed run continues the very weights of
an uninterrupted one. Under ``torchrun`` each rank takes its share of every batch (DDP averages the
gradients; every rank keeps the same EMA) and rank 0 writes. The setup (settings, data, model, resume) is ``pipeline.sldm.train``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from diffusers import DDIMScheduler
from matplotlib.figure import Figure
from PIL import Image

from pipeline.imaging import resize_square
from pipeline.io import atomic_path, write_csv_atomic
from pipeline.seeding import derive_seed
from pipeline.sldm.conditioning import ConditioningEncoder
from pipeline.sldm.model import NULL_CONDITION, diffusion_loss, lr_at, to_model_space
from pipeline.sldm.sampling import sample

HISTORY_KEYS = ("step", "loss", "lr", "images_per_s")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and the kept state."""


@dataclass
class Loop:
    """What every step of one training run uses; built by ``pipeline.sldm.train.train``."""

    model: torch.nn.Module  # Denoiser: UNet + projector
    ema: torch.nn.Module  # its EMA with RCG's warm-up (pipeline.sldm.model.Ema; the saved weights)
    optimizer: torch.optim.Optimizer
    scheduler: object  # the DDPM training schedule
    vae: torch.nn.Module | None  # None: pixel space
    encoder: ConditioningEncoder
    settings: dict
    seed: int
    device: torch.device
    autocast: contextlib.AbstractContextManager  # bf16 on CUDA, a null context otherwise
    ddp_model: torch.nn.Module | None = None  # the model DDP-wrapped under torchrun
    world_size: int = 1
    rank: int = 0


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, "sldm-step", step, rank) % (1 << 62))


def train_step(loop: Loop, images: torch.Tensor, step: int) -> tuple[float, float]:
    """One optimizer step on ``images`` (B, S, S, 3) uint8: (loss, lr)."""
    s = loop.settings
    lr = lr_at(step, s["steps"], s["warmup_steps"], s["lr"], s["min_lr"])
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    gen = step_generator(loop.seed, step, loop.rank)
    torch.manual_seed(derive_seed(loop.seed, "sldm-global", step, loop.rank) % (1 << 62))  # any op on the global RNG
    if s["flip"]:
        flip = torch.rand(images.shape[0], generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(2), images)
    z = loop.encoder.embed(images.numpy(), loop.device)
    x = images.permute(0, 3, 1, 2).to(loop.device).float() / 127.5 - 1.0
    with loop.autocast:
        x0 = to_model_space(loop.vae, x, gen)
        loss = diffusion_loss(loop.ddp_model or loop.model, loop.scheduler, x0, z, s["p_uncond"], gen)
    value = mean_over_ranks(loop, loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(f"non-finite training loss ({value}) at step {step}; stopped without updating")
    loss.backward()
    if s["max_grad_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), s["max_grad_norm"])
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.ema.update_parameters(loop.model)
    return value, lr


def mean_over_ranks(loop: Loop, loss: torch.Tensor) -> float:
    """The loss averaged over the ranks (every rank then sees a NaN anywhere)."""
    if loop.world_size == 1:
        return loss.item()
    total = loss.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / loop.world_size


def run_steps(loop: Loop, batches, history: dict, step: int, bar, on_step) -> int:
    """Steps ``step..steps-1`` over ``batches`` (one batch per step, in step order); ``on_step(done)``
    runs after each (state, sample grid). Returns the final step count."""
    loop.model.train()
    for images in batches:
        t0 = time.perf_counter()
        loss, lr = train_step(loop, images, step)
        rate = images.shape[0] * loop.world_size / max(time.perf_counter() - t0, 1e-9)
        for key, value in zip(HISTORY_KEYS, (step, loss, lr, rate)):
            history[key].append(value)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", images_s=f"{rate:.1f}")
        on_step(step)
    return step


def payload(loop: Loop, step: int, history: dict, fingerprint: str) -> dict:
    """The resumable state: weights, EMA, optimizer, step, history, RNG and the fingerprint."""
    return {
        "model": loop.model.state_dict(),
        "ema": loop.ema.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "step": step,
        "world_size": loop.world_size,
        "history": history,
        # every draw of step k comes from a generator seeded from (seed, k); the global state is
        # kept for completeness
        "rng": {
            "seed": loop.seed,
            "scheme": "per-step CPU generator from (seed, step, rank)",
            "torch": torch.get_rng_state(),
        },
        "fingerprint": fingerprint,
    }


def restore(loop: Loop, state: dict) -> tuple[dict, int]:
    """(history, step) of a resumable state, loaded into the loop's model, EMA and optimizer."""
    loop.model.load_state_dict(state["model"])
    loop.ema.load_state_dict(state["ema"])
    loop.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    return {k: list(state["history"][k]) for k in HISTORY_KEYS}, int(state["step"])


# ---------------------------------------------------------------------------------------------
# outputs


def new_history() -> dict:
    return {k: [] for k in HISTORY_KEYS}


def write_log_csv(history: dict, path) -> None:
    write_csv_atomic(pd.DataFrame({k: history[k] for k in HISTORY_KEYS}), path)


def plot_curve(history: dict, path, title: str) -> None:
    """Loss (left axis, log scale) and lr (right axis) against the step; a bare Agg ``Figure``."""
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(history["step"], history["loss"], lw=1, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to the ε or v target (sldm.prediction_type)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(history["step"], history["lr"], lw=1, color="tab:orange")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def sample_views(loop: Loop, real: np.ndarray) -> np.ndarray:
    """(n, V, h, w, 3) uint8 views of ``real`` (n, S, S, 3) uint8 with the EMA weights: DDIM from
    the training schedule, classifier-free guidance with the trained null token, fixed seeds."""
    cfg = loop.settings["samples"]
    ema = loop.ema.module.eval()
    ddim = DDIMScheduler.from_config(loop.scheduler.config)
    base = derive_seed(loop.seed, "sldm-samples") % (1 << 31)
    seeds = base + np.arange(len(real) * cfg["views"], dtype=np.int64).reshape(len(real), cfg["views"])
    with torch.inference_mode():
        x = sample(
            ema.unet,
            loop.vae,
            ddim,
            ema.projector,
            loop.encoder.embed(real, loop.device),
            seeds,
            steps=cfg["ddim_steps"],
            eta=0.0,
            guidance_scale=cfg["guidance_scale"],
            null_condition=NULL_CONDITION,
            dtype=torch.float32,
            device=loop.device,
        )
    views = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return views.reshape(len(real), cfg["views"], *views.shape[1:])


def write_sample_grid(real: np.ndarray, views: np.ndarray, path, gap: int = 2) -> None:
    """One row per real image: the image, then its generated views (white gaps)."""
    n, V, h = views.shape[0], views.shape[1], views.shape[2]
    grid = np.full((n * (h + gap) - gap, (V + 1) * (h + gap) - gap, 3), 255, np.uint8)
    for i in range(n):
        row = [resize_square(real[i], h), *views[i]]
        for j, tile in enumerate(row):
            grid[i * (h + gap) : i * (h + gap) + h, j * (h + gap) : j * (h + gap) + h] = tile
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
