"""Classifier-free-guidance DDIM sampling of an S-LDM, shared by the training stage (its sample
grids) and the views stage's ``sldm`` generator.

Conditioning: ``projector(embedding)`` is the one cross-attention token (``projector`` an
``Identity`` when the folder has none: RCG); the null token is ``projector(0)`` (``projected_zero``,
the raw embedding zeroed before the projector, as trained here) or an all-zero token
(``zero_token``); ``none`` (a model never trained without its condition) has no null token and is
sampled unguided only. Guidance: ``out = out_u + w (out_c - out_u)`` on the UNet's output, ε or v:
the scheduler's ``prediction_type`` (recorded in the folder) tells DDIM which it is, and guidance is
linear in either. The UNet runs in the sampling ``dtype`` (bf16 / fp16 on GPU), the DDIM update in
float32: the latents never round through half precision between steps. Every view has its own CPU
generator seeded from its seed, so a view depends on (image, seed) only.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

PREDICTION_TYPES = ("epsilon", "v_prediction")  # UNet outputs this sampler reads (DDIM's step does)


def cpu_generators(seeds: np.ndarray) -> list[torch.Generator]:
    """One CPU torch.Generator per view, flattened in (image, view) order."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in np.asarray(seeds).reshape(-1)]


def cfg_conditions(projector, z: torch.Tensor, M: int, null_condition: str, dtype: torch.dtype):
    """Conditional and CFG-null cross-attention tokens, (B*M, 1, D_ctx) each, image-major, from the
    raw embeddings ``z`` (B, D_enc); the null is None for ``none``."""
    cond = projector(z).repeat_interleave(M, 0)[:, None]
    if null_condition == "none":
        return cond.to(dtype), None
    if null_condition == "projected_zero":
        null = projector(torch.zeros_like(z[:1]))[:, None].expand_as(cond)
    else:
        null = torch.zeros_like(cond)
    return cond.to(dtype), null.to(dtype)


def denoise(unet, scheduler, latents, cond, null, gens: list, *, steps: int, eta: float, guidance_scale: float, device):
    """DDIM from ``latents`` (float32) with classifier-free guidance ``out_u + w (out_c - out_u)``
    on the UNet's output (ε or v, the scheduler's ``prediction_type``); the UNet runs in its own
    dtype, every DDIM update in float32."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {kind!r}: this sampler reads {PREDICTION_TYPES}")
    w = float(guidance_scale)
    scheduler.set_timesteps(int(steps), device=device)
    use_cfg = w != 1.0
    if use_cfg and null is None:
        raise ValueError(f"guidance_scale {w} needs a CFG null token; this model has none (use 1.0)")
    latents = latents.float()
    for t in scheduler.timesteps:
        inp = torch.cat([latents, latents]) if use_cfg else latents
        inp = scheduler.scale_model_input(inp, t)
        ctx = torch.cat([null, cond]) if use_cfg else cond
        out = unet(inp.to(unet.dtype), t, encoder_hidden_states=ctx).sample.float()
        if use_cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + w * (out_c - out_u)
        latents = scheduler.step(out, t, latents, eta=float(eta), generator=gens).prev_sample
    return latents


def decode(vae, latents) -> torch.Tensor:
    """Latents -> images in [0, 1], (N, 3, h, w) float32 (NaN kept); the VAE decodes in float32,
    and in pixel space (``vae`` None) the UNet denoised the image itself, in [-1, 1]."""
    if vae is not None:
        x = vae.decode(latents.float() / vae.config.scaling_factor).sample
    else:
        x = latents.float()
    return (x / 2 + 0.5).clamp(0, 1)


def sample(
    unet,
    vae,
    scheduler,
    projector,
    z: torch.Tensor,
    seeds: np.ndarray,
    *,
    steps: int,
    eta: float,
    guidance_scale: float,
    null_condition: str,
    dtype: torch.dtype,
    device,
) -> torch.Tensor:
    """Views of the images whose raw embeddings are ``z`` (B, D_enc), one per entry of ``seeds``
    (B, M): (B*M, 3, h, w) in [0, 1], image-major. Call under ``torch.inference_mode()``."""
    seeds = np.asarray(seeds, dtype=np.int64)
    cond, null = cfg_conditions(projector, z, seeds.shape[1], null_condition, dtype)
    gens = cpu_generators(seeds)
    c = unet.config
    shape = (seeds.size, c.in_channels, c.sample_size, c.sample_size)
    # float32 latents whatever the UNet's dtype (denoise casts the UNet's input only)
    latents = randn_tensor(shape, generator=gens, device=torch.device(device), dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    latents = denoise(
        unet, scheduler, latents, cond, null, gens, steps=steps, eta=eta, guidance_scale=guidance_scale, device=device
    )
    return decode(vae, latents)
