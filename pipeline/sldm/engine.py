"""The S-LDM training loop: one optimizer step, the resumable state, the sample grid (the lr
schedule, the loss rule, the history and its outputs ``train_log.csv`` and the loss curve:
``pipeline.training``).

Every step is a function of (seed, step): the lr is set from the step index before the update, and
every random draw of the step (flip, timesteps, condition drops, noise, VAE latent sample) comes
from a CPU generator seeded from (seed, step, rank), so a resumed run continues the very weights of
an uninterrupted one. Under ``torchrun`` each rank takes its share of every batch (DDP averages the
gradients; every rank keeps the same EMA) and rank 0 writes. The setup (settings, data, model, resume) is ``pipeline.sldm.train``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from pipeline.imaging import resize_square
from pipeline.io import atomic_path
from pipeline.seeding import derive_seed
from pipeline.sldm.conditioning import ConditioningEncoder
from pipeline.sldm.model import NULL_CONDITION, diffusion_loss, to_model_space
from pipeline.sldm.sampling import sample
from pipeline.training import (
    StepTimer,
    TrainingLoop,
    check_loss,
    loader_batches,
    lr_at,
    mean_over_ranks,
    payload,
    record_step,
    restore,
    set_lr,
)

HISTORY_KEYS = ("step", "loss", "lr", "images_per_s")
LOG = logging.getLogger("cdgmae.sldm")


@dataclass(kw_only=True)
class Loop(TrainingLoop):
    """What every step of one training run uses (``model``: the Denoiser, UNet + projector;
    ``autocast``: bf16 on CUDA, a null context otherwise); built by ``pipeline.sldm.train.train``."""

    ema: torch.nn.Module  # its EMA with RCG's warm-up (pipeline.sldm.model.Ema; the saved weights)
    scheduler: object  # the DDPM training schedule
    vae: torch.nn.Module | None  # None: pixel space
    encoder: ConditioningEncoder

    def state_parts(self) -> dict:
        """What the resumable state holds the state dicts of."""
        return {"model": self.model, "ema": self.ema, "optimizer": self.optimizer}


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, "sldm-step", step, rank) % (1 << 62))


def train_step(loop: Loop, images: torch.Tensor, step: int) -> tuple[float, float]:
    """One optimizer step on ``images`` (B, S, S, 3) uint8: (loss, lr)."""
    s = loop.settings
    lr = lr_at(step, warmup=s["warmup_steps"], total=s["steps"], peak_lr=s["lr"], min_lr=s["min_lr"])  # in steps
    set_lr(loop.optimizer, lr)
    gen = step_generator(loop.seed, step, loop.rank)
    torch.manual_seed(derive_seed(loop.seed, "sldm-global", step, loop.rank) % (1 << 62))  # any op on the global RNG
    if s["flip"]:
        flip = torch.rand(images.shape[0], generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(2), images)
    z = loop.encoder.embed(images.numpy(), loop.device)
    x = images.permute(0, 3, 1, 2).to(loop.device).float() / 127.5 - 1.0
    with loop.autocast:
        x0 = to_model_space(loop.vae, x, gen)
        loss = diffusion_loss(loop.step_model, loop.scheduler, x0, z, s["p_uncond"], gen)
    value = mean_over_ranks(loss.detach().float().clone(), 1, loop.world_size)
    check_loss(value, step)
    loss.backward()
    if s["max_grad_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), s["max_grad_norm"])
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.ema.update_parameters(loop.model)
    return value, lr


def run_steps(loop: Loop, loader, history: dict, step: int, bar, on_step) -> int:
    """Steps ``step..steps-1`` over ``loader`` (one batch per step, in step order); ``on_step(done)``
    runs after each (state, sample grid). Returns the final step count."""
    loop.model.train()
    with loader_batches(loader) as batches:
        for images in batches:
            timer = StepTimer()
            loss, lr = train_step(loop, images, step)
            rate = timer.rate(images.shape[0] * loop.world_size)
            record_step(history, bar, step=step, loss=loss, lr=lr, images_per_s=rate)
            step += 1
            on_step(step)
    return step


def state_payload(loop: Loop, step: int, history: dict, fingerprint: str) -> dict:
    """The resumable state: weights, EMA, optimizer, step, RNG, the fingerprint and the history."""
    return payload(
        loop.state_parts(),
        step=step,
        world_size=loop.world_size,
        # every draw of step k comes from a generator seeded from (seed, k); the global state is
        # kept for completeness
        rng={
            "seed": loop.seed,
            "scheme": "per-step CPU generator from (seed, step, rank)",
            "torch": torch.get_rng_state(),
        },
        fingerprint=fingerprint,
        history=history,
    )


def resume(loop: Loop, state: dict) -> tuple[dict, int]:
    """(history, step) of a resumable state, loaded into the loop's model, EMA, optimizer and RNG."""
    saved_world = state.get("world_size", 1)
    history, step = restore(
        state, loop.state_parts(), HISTORY_KEYS, world_size=loop.world_size, saved_world_size=saved_world, log=LOG
    )
    torch.set_rng_state(state["rng"]["torch"])
    return history, step


# ---------------------------------------------------------------------------------------------
# outputs


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
