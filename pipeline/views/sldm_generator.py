"""The self-supervised LDM view generator (``sldm``).

Gen-SIS / RCG style: ``UNet2DConditionModel`` + ``AutoencoderKL`` / ``VQModel`` (or pixel space) +
DDIM sampling, conditioned on the CLS embedding of a timm ViT (optionally through a projection
MLP), projected by a Linear (or not) to one cross-attention token, with our own
classifier-free-guidance loop (``pipeline.sldm.sampling``). It loads the folder the ``sldm`` stage
writes, or ``import-rcg`` converts (``pipeline.sldm.folder``, ``docs/sldm-format.md``), validated on
load; ``rcg`` is the same generator under its own name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
from safetensors.torch import load_file

from pipeline.devices import resolve_device
from pipeline.io import folder_sha256
from pipeline.sldm.conditioning import embed_images, projection_head, timm_vit
from pipeline.sldm.folder import SLDMFolderError, autoencoder_class, validate_folder
from pipeline.sldm.sampling import sample
from pipeline.views.diffusion import model_dir, to_output, torch_dtype
from pipeline.views.registry import ViewGenerator, register

AUTOENCODER_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}


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
        super().__init__(settings, image_size, device)
        self.device = resolve_device(device)
        # bf16 by default: the precision training's autocast ran the UNet in (float32 on the CPU)
        self.dtype = torch_dtype(self.settings.get("dtype", "bfloat16"), self.device)
        path = model_dir(self.settings, self.name)
        self.manifest = man = validate_folder(path)
        self.model_sha256 = folder_sha256(path)  # which weights made the views (Tables 9 / 10 rows)
        # the CFG null token training used, unless the settings override it
        self.null_condition = self.settings.get("null_condition") or man["conditioning"]["null_condition"]
        if self.null_condition == "none" and float(self.settings.get("guidance_scale", 6.0)) != 1.0:
            raise SLDMFolderError(
                f"{path}: trained without dropping its condition (null_condition none), so it has no "
                f"CFG null: set views.generators.{self.name}.guidance_scale to 1.0"
            )
        self._load_encoder(path, man["encoder"], man["projector"])
        self.unet = UNet2DConditionModel.from_pretrained(path / man["unet"], local_files_only=True)
        vae_class = autoencoder_class(path, man)
        self.vae = (
            AUTOENCODER_CLASSES[vae_class].from_pretrained(path / man["vae"], local_files_only=True)
            if vae_class
            else None
        )
        self.scheduler = DDIMScheduler.from_pretrained(path / man["scheduler"]["folder"], local_files_only=True)
        self._check_shapes(path)
        self.encoder.to(self.device).eval()
        self.projector.to(self.device).eval()
        self.unet.to(self.device, self.dtype).eval()
        if self.vae is not None:
            self.vae.to(self.device, torch.float32).eval()

    def _check_shapes(self, path: Path) -> None:
        """The components fit together: embedding -> projector (or none) -> UNet context, UNet
        channels -> the autoencoder's latents."""
        width, token = self.embed_dim, self.embed_dim
        if isinstance(self.projector, torch.nn.Linear):
            if self.projector.in_features != width:
                raise SLDMFolderError(
                    f"{path}: projector in_features {self.projector.in_features} != embedding {width}"
                )
            token = self.projector.out_features
        if self.unet.config.cross_attention_dim != token:
            raise SLDMFolderError(
                f"{path}: conditioning token width {token} != UNet "
                f"cross_attention_dim {self.unet.config.cross_attention_dim}"
            )
        channels = self.vae.config.latent_channels if self.vae is not None else 3
        if self.unet.config.in_channels != channels:
            raise SLDMFolderError(
                f"{path}: UNet in_channels {self.unet.config.in_channels} != {channels} "
                f"({'VAE latent channels' if self.vae is not None else 'RGB, pixel space'})"
            )

    def _load_encoder(self, path: Path, enc: dict, pr: dict | None) -> None:
        """The timm ViT (then its projection head, if any), its input size, resize and
        normalization, and the Linear projector (an Identity where the folder has none), on CPU."""
        vit = timm_vit(enc["timm_name"], enc.get("kwargs", {}))
        vit.load_state_dict(load_file(path / enc["weights"]), strict=True)
        self.embed_dim, self.encoder = int(vit.num_features), vit
        if enc.get("head"):
            head = projection_head(enc["head"]["dims"])
            head.load_state_dict(load_file(path / enc["head"]["weights"]), strict=True)
            self.embed_dim, self.encoder = int(enc["head"]["dims"][-1]), torch.nn.Sequential(vit, head)
        self.enc_size = int(enc["input_size"])
        self.enc_norm = enc.get("embedding_norm", "none")
        self.antialias = bool(enc.get("resize_antialias", True))
        self.mean = torch.tensor(enc["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(enc["std"]).view(1, 3, 1, 1)
        if pr is None:
            self.projector = torch.nn.Identity()
            return
        self.projector = torch.nn.Linear(int(pr["in_features"]), int(pr["out_features"]))
        self.projector.load_state_dict(load_file(path / pr["weights"]), strict=True)

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
        return embed_images(
            self.encoder, images, self.enc_size, self.mean, self.std, self.enc_norm, self.device, self.antialias
        )

    def generate(self, images, seeds):
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
