"""Diffusion view generators: the helpers they share and ``sd-variation``.

Weights come from a local folder only (``views.generators.<name>.model_path``); nothing is
downloaded. Views are returned as float so that fp16 NaNs survive for the caller to regenerate.
The S-LDM (``sldm``) lives in ``pipeline.views.sldm_generator``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.devices import resolve_device
from pipeline.imaging import resize_square
from pipeline.views.registry import ViewGenerator, register

LOG = logging.getLogger("cdgmae.generators")


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The ``dtype`` setting as a torch dtype; float32 on CPU."""
    if device == "cpu" and name != "float32":
        # half precision matmuls are slow or unsupported on CPU; results are float32 there
        LOG.info("dtype %s requested but running on CPU: using float32", name)
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def model_dir(settings: dict, name: str) -> Path:
    """The generator's local weights folder (``model_path``), checked to exist."""
    path = settings.get("model_path")
    if not path:
        raise ValueError(
            f"views.generators.{name}.model_path is not set: {name} needs a local "
            "weights folder (nothing is downloaded)"
        )
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"views.generators.{name}.model_path: {path} is not a directory")
    return path


def to_output(views, image_size: int) -> np.ndarray:
    """(N, H, W, 3) float tensor/array in [0, 1] at native resolution -> resized float32 numpy.

    NaNs survive (clamp and resize propagate them) so that the caller can regenerate the view.
    """
    arr = views.detach().float().cpu().numpy() if hasattr(views, "detach") else np.asarray(views)
    arr = arr.astype(np.float32, copy=False)
    if arr.shape[1] != image_size or arr.shape[2] != image_size:
        arr = np.stack([resize_square(a, image_size) for a in arr])
    return arr


@register("sd-variation")
class SDVariationGenerator(ViewGenerator):
    """lambdalabs-style SD image variations: CLIP image embedding -> 1 cross-attn token, CFG.

    Views are generated at the pipeline's native resolution (``unet.sample_size`` x VAE factor) and
    resized to ``image_size``; the conditioning image goes through the pipeline's own
    ``CLIPImageProcessor``.
    """

    def __init__(self, settings, image_size=96, device=None):
        # diffusers (and transformers' CLIP), imported where this generator is built: every view
        # job imports this registry, and a weights-free generator's job spends no 4 s importing them
        from diffusers import DDIMScheduler, StableDiffusionImageVariationPipeline  # noqa: PLC0415

        super().__init__(settings, image_size, device)
        self.device = resolve_device(device)
        dtype = torch_dtype(self.settings.get("dtype", "float16"), self.device)
        path = model_dir(self.settings, self.name)
        # the safety checker would black out views; it is not part of the paper's generation
        self.pipe = StableDiffusionImageVariationPipeline.from_pretrained(
            path, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        # the paper samples with DDIM (eta from the settings); the public image-variation folder
        # ships PNDM, which would ignore eta: DDIM from the folder's own noise-schedule config.
        # Latent x0 is never clipped: SD latents are about unit-variance (a third of the entries
        # lie outside +-1), and DDIM's default clip_sample=True, which that config does not set,
        # would wash the views out; diffusers' Stable Diffusion pipelines turn it off likewise.
        self.shipped_scheduler = type(self.pipe.scheduler).__name__
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, clip_sample=False)
        # cast explicitly (a from_pretrained dtype argument is dropped by some diffusers versions)
        self.pipe.to(device=self.device, dtype=dtype)
        self.dtype = self.pipe.unet.dtype  # the dtype it really runs in, as recorded
        self.pipe.set_progress_bar_config(disable=True)
        self.native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def describe(self) -> dict:
        s = self.settings
        sampler = {
            "scheduler": type(self.pipe.scheduler).__name__,
            "scheduler_config_from": self.shipped_scheduler,
            "steps": int(s.get("steps", 50)),
            "eta": float(s.get("eta", 0.0)),
            "guidance_scale": float(s.get("guidance_scale", 6.0)),
            "clip_sample": bool(self.pipe.scheduler.config.clip_sample),
            "dtype": str(self.dtype).removeprefix("torch."),
            "native_size": self.native,
        }
        return {**super().describe(), "sampler": sampler}

    def generate(self, images, seeds):
        from pipeline.sldm.sampling import cpu_generators  # noqa: PLC0415  (diffusers: see __init__)

        seeds = np.asarray(seeds, dtype=np.int64)
        B, M = seeds.shape
        s = self.settings
        with torch.inference_mode():
            out = self.pipe(
                image=[Image.fromarray(np.asarray(im)) for im in images],
                height=self.native,
                width=self.native,
                num_inference_steps=int(s.get("steps", 50)),
                guidance_scale=float(s.get("guidance_scale", 6.0)),
                eta=float(s.get("eta", 0.0)),
                num_images_per_prompt=M,
                generator=cpu_generators(seeds),
                output_type="pt",
            ).images
        # (B*M, 3, h, w) ordered image-major (the pipeline repeats each embedding M times)
        arr = to_output(out.permute(0, 2, 3, 1), self.image_size)
        return arr.reshape(B, M, self.image_size, self.image_size, 3)
