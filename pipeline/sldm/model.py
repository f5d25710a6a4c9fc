"""The S-LDM being trained: a diffusers ``UNet2DConditionModel`` and the Linear projector of the
conditioning embedding (one cross-attention token), the DDPM training schedule, the EMA of both,
the autoencoder (a local ``AutoencoderKL`` folder, or none: pixel space) and the loss.

Loss: MSE at a uniformly drawn timestep against the target of ``sldm.prediction_type``: the noise ε
(``epsilon``) or the velocity v = √ᾱ ε − √(1−ᾱ) x0 (``v_prediction``, diffusers' ``get_velocity``).
The noise schedule (``sldm.scheduler``) defaults by space: DDPM's pixel-space betas, or CompVis
LDM's ``scaled_linear`` 0.0015 → 0.0195 with its DDIM offsets for latents (``resolve_schedule``).
Classifier-free guidance is trained by zeroing
the *raw* embedding with probability ``p_uncond`` before the projector, so the null token the UNet
learns is ``projector(0)`` = the projector's bias (``null_condition: projected_zero``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from pipeline.seeding import derive_seed
from pipeline.sldm.sampling import PREDICTION_TYPES  # what the UNet predicts (sldm.prediction_type)

NULL_CONDITION = "projected_zero"  # how this training drops the condition (recorded in sldm.json)


class Denoiser(torch.nn.Module):
    """UNet + projector: ``forward(x_t, t, z)`` predicts ε or v (``sldm.prediction_type``) given the
    raw embeddings ``z``."""

    def __init__(self, unet: UNet2DConditionModel, projector: torch.nn.Linear):
        super().__init__()
        self.unet, self.projector = unet, projector

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=self.projector(z)[:, None]).sample


def attention_heads(settings: dict) -> list[int]:
    """Heads per level of ``sldm.unet``: ``block_out_channels[i] // head_channels`` (channels per
    head, as openaimodel's ``num_head_channels``). diffusers' ``attention_head_dim`` is, by legacy
    naming, the number of heads, so it is passed this list. A level with attention (or the last
    one, the mid block's) whose width ``head_channels`` does not divide is an error naming both."""
    channels, attention = list(settings["block_out_channels"]), list(settings["attention"])
    width = int(settings["head_channels"])
    heads = []
    for i, c in enumerate(channels):
        used = attention[i] or (i == len(channels) - 1 and any(attention))
        if used and c % width:
            raise ValueError(
                f"sldm.unet.head_channels {width} does not divide block_out_channels[{i}] = {c} "
                "(a level with attention: its heads would not have head_channels channels each)"
            )
        heads.append(max(c // width, 1))  # a level without attention never uses its count
    return heads


def build_unet(settings: dict, in_channels: int, sample_size: int) -> UNet2DConditionModel:
    """The UNet of ``sldm.unet``: cross-attention blocks where ``attention`` says so, heads of
    ``head_channels`` channels (``attention_heads``)."""
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
        attention_head_dim=attention_heads(settings),  # diffusers' name for the heads per level
        cross_attention_dim=settings["cross_attention_dim"],
        norm_num_groups=settings["norm_num_groups"],
    )


# the schedule keys whose null (schema default) is resolved by the space the UNet denoises:
# pixel space = DDPM (Ho et al.) and diffusers' DDIM defaults; latent space = CompVis LDM, as RCG's
# LDM-8 (config/ldm/cin-ldm-vq-f8-repcond.yaml linear_start/end, LDM's "linear" = linear in sqrt(beta))
# and LIDM (configs/latent-diffusion/brca/only_ssl.yaml), sampled with CompVis's DDIM (timesteps
# 1 + k T/steps: 981...1 at 50 steps; the last step's alpha_prev = alphas_cumprod[0])
SCHEDULE_DEFAULTS = {
    "pixel": {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "steps_offset": 0,
        "set_alpha_to_one": True,
        "timestep_spacing": "leading",
    },
    "latent": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
    },
}
# the DDIM keys the folder records for the sampler to keep (scheduler.sampling in sldm.json)
SAMPLING_KEYS = ("clip_sample", "steps_offset", "set_alpha_to_one", "timestep_spacing")


def resolve_schedule(settings: dict, pixel_space: bool) -> dict:
    """``sldm.scheduler`` with every null key given its default for the space (``SCHEDULE_DEFAULTS``)."""
    defaults = SCHEDULE_DEFAULTS["pixel" if pixel_space else "latent"]
    return {**settings, **{k: v for k, v in defaults.items() if settings.get(k) is None}}


def build_scheduler(settings: dict, pixel_space: bool = False, prediction_type: str = "epsilon") -> DDIMScheduler:
    """The training noise schedule of ``sldm.scheduler`` (nulls resolved for the space,
    ``resolve_schedule``) and the DDIM sampler's keys, in one ``DDIMScheduler`` (its ``add_noise``
    and ``get_velocity`` are DDPM's): the config the folder ships is the one sampling loads.
    ``prediction_type``: ``epsilon`` or ``v_prediction`` (the loss target, and how DDIM reads the
    UNet). In pixel space the sampler clips its x0 estimate to the image range [-1, 1], as DDPM
    does: an imperfect ε at high noise otherwise blows x0 up far outside it and DDIM's few large
    steps never recover (measured on the CPU demo's 400-step model: pure noise unclipped). Latents
    have no such range: no clipping."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"sldm.prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    s = resolve_schedule(settings, pixel_space)
    return DDIMScheduler(
        num_train_timesteps=s["num_train_timesteps"],
        beta_start=s["beta_start"],
        beta_end=s["beta_end"],
        beta_schedule=s["beta_schedule"],
        prediction_type=prediction_type,
        clip_sample=bool(pixel_space),
        clip_sample_range=1.0,
        steps_offset=int(s["steps_offset"]),
        set_alpha_to_one=bool(s["set_alpha_to_one"]),
        timestep_spacing=s["timestep_spacing"],
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


def ema_decay_at(n: int, decay: float) -> float:
    """The decay of the ``n``-th EMA update (n = 1, 2, ...): RCG's warm-up (CompVis ``LitEma``,
    ``ldm/modules/ema.py``: ``min(self.decay, (1 + num_updates) / (10 + num_updates))``)."""
    return min(float(decay), (1.0 + n) / (10.0 + n))


class Ema(torch.nn.Module):
    """EMA of every parameter with RCG's warm-up, as CompVis ``LitEma``: the average starts at the
    initial weights and the ``n``-th update is ``ema <- d_n ema + (1 - d_n) w`` with
    ``d_n = ema_decay_at(n, decay)``. Without the warm-up a short run keeps its first steps: 300
    steps at decay 0.995 left 0.995**299 = 22 % of the step-1 weights in the saved model; with it,
    7e-16. ``module`` holds the averaged copy; ``num_updates`` is saved with it."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = float(decay)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        weight = 1.0 - ema_decay_at(int(self.num_updates), self.decay)
        for avg, p in zip(self.module.parameters(), model.parameters(), strict=True):
            avg.lerp_(p.detach().to(avg.device, avg.dtype), weight)


def build_ema(model: Denoiser, decay: float) -> Ema:
    """EMA of every parameter with RCG's warm-up (``Ema``; the saved weights)."""
    return Ema(model, decay)


def to_model_space(vae, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> what the UNet denoises: VAE latents (sampled, scaled) or the pixels."""
    if vae is None:
        return images
    # float32 whatever the caller's autocast (train_step encodes inside its bf16 one): the
    # posterior sample and the noise added to it at full precision
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        return (vae.encode(images).latent_dist.sample(generator=gen) * vae.config.scaling_factor).float()


def loss_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x0 (``get_velocity``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"prediction_type {kind!r} is not trained here (one of {PREDICTION_TYPES})")


def diffusion_loss(model, scheduler: DDIMScheduler, x0: torch.Tensor, z: torch.Tensor, p_uncond: float, gen):
    """MSE of the UNet's output against ``loss_target`` (ε or v, the scheduler's
    ``prediction_type``); the raw embedding is zeroed with probability ``p_uncond`` (CFG
    training). Every draw (timesteps, drops, noise) comes from the CPU generator ``gen``."""
    B = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=gen)
    keep = (torch.rand(B, generator=gen) >= p_uncond).to(z.dtype)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    t, keep, noise = t.to(x0.device), keep.to(x0.device), noise.to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, t, z * keep[:, None])
    return F.mse_loss(out.float(), loss_target(scheduler, x0, noise, t).float())
