"""The S-LDM being trained: a diffusers ``UNet2DConditionModel`` and the Linear projector of the
conditioning embedding (one cross-attention token), the DDPM training schedule, the EMA of both,
the autoencoder (a local ``AutoencoderKL`` folder, or none: pixel space) and the loss.

Loss: ε-prediction MSE at a uniformly drawn timestep. Classifier-free guidance is trained by zeroing
the *raw* embedding with probability ``p_uncond`` before the projector, so the null token the UNet
learns is ``projector(0)`` = the projector's bias (``null_condition: projected_zero``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.seeding import derive_seed

NULL_CONDITION = "projected_zero"  # how this training drops the condition (recorded in sldm.json)


class Denoiser(torch.nn.Module):
    """UNet + projector: ``forward(x_t, t, z)`` predicts the noise given the raw embeddings ``z``."""

    def __init__(self, unet: UNet2DConditionModel, projector: torch.nn.Linear):
        super().__init__()
        self.unet, self.projector = unet, projector

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=self.projector(z)[:, None]).sample


def build_unet(settings: dict, in_channels: int, sample_size: int) -> UNet2DConditionModel:
    """The UNet of ``sldm.unet``: cross-attention blocks where ``attention`` says so."""
    channels, attention = list(settings["block_out_channels"]), list(settings["attention"])
    if len(attention) != len(channels):
        raise ValueError(
            f"sldm.unet.attention has {len(attention)} flags for {len(channels)} block_out_channels levels"
        )
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if any(attention) else None,
        layers_per_block=settings["layers_per_block"],
        attention_head_dim=settings["attention_head_dim"],
        cross_attention_dim=settings["cross_attention_dim"],
        norm_num_groups=settings["norm_num_groups"],
    )


def build_scheduler(settings: dict, pixel_space: bool = False) -> DDPMScheduler:
    """The DDPM training noise schedule of ``sldm.scheduler`` (ε-prediction). In pixel space the
    sampler clips its x0 estimate to the image range [-1, 1], as DDPM does: an imperfect ε at high
    noise otherwise blows x0 up far outside it and DDIM's few large steps never recover (measured on
    the CPU demo's 400-step model: pure noise unclipped). Latents have no such range: no clipping."""
    return DDPMScheduler(
        num_train_timesteps=settings["num_train_timesteps"],
        beta_start=settings["beta_start"],
        beta_end=settings["beta_end"],
        beta_schedule=settings["beta_schedule"],
        prediction_type="epsilon",
        clip_sample=bool(pixel_space),
        clip_sample_range=1.0,
    )


def load_autoencoder(value: str):
    """``sldm.autoencoder``: None for ``none`` (pixel space), else the local AutoencoderKL folder."""
    if value == "none":
        return None
    path = Path(value)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"sldm.autoencoder: {path / 'config.json'} not found (a diffusers AutoencoderKL folder)"
        )
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    return vae.requires_grad_(False).eval()


def build_denoiser(settings: dict, encoder_dim: int, in_channels: int, sample_size: int, seed: int) -> Denoiser:
    """UNet + projector initialized from the seed alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "sldm-init") % (1 << 62))
        unet = build_unet(settings["unet"], in_channels, sample_size)
        projector = torch.nn.Linear(encoder_dim, settings["unet"]["cross_attention_dim"])
    return Denoiser(unet, projector)


def build_ema(model: Denoiser, decay: float) -> AveragedModel:
    """EMA of every parameter (``AveragedModel``; its first update copies the weights)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then half-cycle cosine to ``min_lr`` at ``total``."""
    if step < warmup:
        return peak * step / warmup
    span = max(total - warmup, 1)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / span, 1.0)))


def to_model_space(vae, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> what the UNet denoises: VAE latents (sampled, scaled) or the pixels."""
    if vae is None:
        return images
    with torch.no_grad():  # float32 whatever the autocast: the noise is added at full precision
        return (vae.encode(images).latent_dist.sample(generator=gen) * vae.config.scaling_factor).float()


def diffusion_loss(model, scheduler: DDPMScheduler, x0: torch.Tensor, z: torch.Tensor, p_uncond: float, gen):
    """ε-prediction MSE; the raw embedding is zeroed with probability ``p_uncond`` (CFG training).
    Every draw (timesteps, drops, noise) comes from the CPU generator ``gen``."""
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=gen)
    keep = (torch.rand(B, generator=gen) >= p_uncond).to(z.dtype)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    t, keep, noise = t.to(x0.device), keep.to(x0.device), noise.to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    eps = model(x_t, t, z * keep[:, None])
    return F.mse_loss(eps.float(), noise.float())
