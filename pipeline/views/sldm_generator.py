"""The self-supervised LDM view generator (``sldm``).

Gen-SIS / RCG style: ``UNet2DConditionModel`` + ``AutoencoderKL`` / ``VQModel`` (or pixel space) +
DDIM sampling, conditioned on the CLS embedding of a timm ViT (optionally through a projection
MLP), projected by a Linear (or not) to one cross-attention token, with our own
classifier-free-guidance loop (``pipeline.sldm.sampling``). It loads the folder the ``sldm`` stage
writes, or ``import-rcg`` converts, through that format's reader (``pipeline.sldm.folder.load_sldm``,
``docs/sldm-format.md``: validated on load); this module only samples. ``rcg`` is the same generator
under its own name.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.devices import resolve_device
from pipeline.io import folder_sha256
from pipeline.views.diffusion import model_dir, to_output, torch_dtype
from pipeline.views.registry import ViewGenerator, register


@register("sldm")
class SLDMGenerator(ViewGenerator):
    """Self-supervised LDM: timm-ViT CLS embedding -> Linear -> one cross-attention token.

    CFG null condition (``null_condition``):
    - ``projected_zero``: projector(0) = its bias, i.e. the raw SSL embedding zeroed as in the
      Large-Image-Diffusion / PathLDM training recipe (``p_uncond`` drops the raw embedding);
    - ``zero_token``: an all-zero token after projection, as diffusers' image-variation pipeline;
    - ``none``: no null token (never trained without its condition): unguided only.
    Sampling: DDIM, ``eps_cfg = eps_u + w (eps_c - eps_u)``; the VAE decodes in float32 to avoid the
    fp16 NaN (black image) failure mode.
    """

    def __init__(self, settings, image_size=96, device=None):
        # diffusers and timm, imported where a diffusion generator is built: every view job imports
        # this registry, and a weights-free generator's job spends no 5 s importing them
        from pipeline.sldm.folder import SLDMFolderError, load_sldm  # noqa: PLC0415

        super().__init__(settings, image_size, device)
        self.device = resolve_device(device)
        # bf16 by default: the precision training's autocast ran the UNet in (float32 on the CPU)
        self.dtype = torch_dtype(self.settings.get("dtype", "bfloat16"), self.device)
        path = model_dir(self.settings, self.name)
        parts = load_sldm(path)
        self.manifest = man = parts.manifest
        self.model_sha256 = folder_sha256(path)  # which weights made the views (Tables 9 / 10 rows)
        # the CFG null token training used, unless the settings override it
        self.null_condition = self.settings.get("null_condition") or man["conditioning"]["null_condition"]
        if self.null_condition == "none" and float(self.settings.get("guidance_scale", 6.0)) != 1.0:
            raise SLDMFolderError(
                f"{path}: trained without dropping its condition (null_condition none), so it has no "
                f"CFG null: set views.generators.{self.name}.guidance_scale to 1.0"
            )
        self.encoder, self.projector, self.unet, self.vae = parts.encoder, parts.projector, parts.unet, parts.vae
        self.scheduler, self.mean, self.std = parts.scheduler, parts.mean, parts.std
        self.enc_size, self.enc_norm, self.antialias = parts.input_size, parts.embedding_norm, parts.resize_antialias
        self.encoder.to(self.device).eval()
        self.projector.to(self.device).eval()
        self.unet.to(self.device, self.dtype).eval()
        if self.vae is not None:
            self.vae.to(self.device, torch.float32).eval()

    def describe(self) -> dict:
        s = self.settings
        sampler = {
            "scheduler": type(self.scheduler).__name__,
            "steps": int(s.get("steps", 50)),
            "eta": float(s.get("eta", 0.0)),
            "guidance_scale": float(s.get("guidance_scale", 6.0)),
            "null_condition": self.null_condition,
            "dtype": str(self.dtype).removeprefix("torch."),
            # what the UNet predicts (the folder's scheduler config): DDIM reads its output so
            "prediction_type": self.scheduler.config.prediction_type,
        }
        return {**super().describe(), "manifest": self.manifest, "model_sha256": self.model_sha256, "sampler": sampler}

    def embed(self, images: np.ndarray):
        """(B, H, W, 3) uint8 -> (B, D_enc) CLS embeddings (bicubic resize, mean/std normalized)."""
        from pipeline.sldm.conditioning import embed_images  # noqa: PLC0415  (timm: see __init__)

        return embed_images(
            self.encoder, images, self.enc_size, self.mean, self.std, self.enc_norm, self.device, self.antialias
        )

    def generate(self, images, seeds):
        from pipeline.sldm.sampling import sample  # noqa: PLC0415  (diffusers: see __init__)

        seeds = np.asarray(seeds, dtype=np.int64)
        B, M = seeds.shape
        s = self.settings
        with torch.inference_mode():
            x = sample(
                self.unet,
                self.vae,
                self.scheduler,
                self.projector,
                self.embed(np.asarray(images)),
                seeds,
                steps=int(s.get("steps", 50)),
                eta=float(s.get("eta", 0.0)),
                guidance_scale=float(s.get("guidance_scale", 6.0)),
                null_condition=self.null_condition,
                dtype=self.dtype,
                device=self.device,
            )  # (B*M, 3, h, w) in [0, 1], NaN kept
        arr = to_output(x.permute(0, 2, 3, 1), self.image_size)
        return arr.reshape(B, M, self.image_size, self.image_size, 3)


@register("rcg")
class RCGGenerator(SLDMGenerator):
    """RCG's LDM-8 (MoCo v3 representation, one cross-attention token, VQ-f8), imported as an
    ``sldm`` folder (``python -m pipeline.sldm import-rcg``; rules/sldm.smk ``import_rcg``).

    The same loader and sampler as ``sldm``; its own name keeps its bag, settings and table rows
    apart (Tables 9/10: beside the paper's "RCG S-LDM"). RCG samples unguided (its LDM has no CFG
    null), with DDIM, eta 1 and the EMA weights.
    """
