"""The self-supervised LDM view generator (``sldm``) and the folder it loads (``save_sldm``).

Gen-SIS / RCG style: ``UNet2DConditionModel`` + ``AutoencoderKL`` (or pixel space) + DDIM sampling,
conditioned on the CLS embedding of a timm ViT, projected by a Linear to one cross-attention token,
with our own classifier-free-guidance loop. One local folder with a JSON manifest (``sldm.json``);
the format is documented in ``docs/sldm-format.md`` and validated on load (``validate_folder``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file

from pipeline.devices import resolve_device
from pipeline.views.base import ViewGenerator, register
from pipeline.views.diffusion import cpu_generators, model_dir, to_output, torch_dtype

SLDM_MANIFEST = "sldm.json"
MANIFEST_KEYS = ("encoder", "projector", "unet", "vae", "scheduler", "conditioning")
# the noise-schedule keys the sampler must agree on with training (checked, not assumed)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
NULL_CONDITIONS = ("projected_zero", "zero_token")


class SLDMFolderError(ValueError):
    """An S-LDM folder that does not match its documented format; the message names the file/key."""


def save_sldm(
    folder,
    unet,
    vae,
    scheduler,
    encoder,
    encoder_name: str,
    projector,
    encoder_kwargs: dict | None = None,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    embedding_norm: str = "none",
    null_condition: str = "projected_zero",
    p_uncond: float | None = None,
) -> Path:
    """Write an S-LDM folder in the layout :class:`SLDMGenerator` loads.

    Layout (``docs/sldm-format.md``): ``unet/``, ``vae/`` (absent for a pixel-space model, ``vae``
    None), ``scheduler/`` (diffusers ``save_pretrained``; the training noise schedule),
    ``encoder.safetensors`` (timm ViT state dict), ``projector.safetensors`` (Linear D_enc -> D_ctx)
    and ``sldm.json``: the encoder's timm name/kwargs, input size and normalization, the schedule the
    UNet was trained with, and the classifier-free-guidance convention (``null_condition``: the
    null token training used; ``p_uncond``: how often the condition was dropped, when known).
    """
    if null_condition not in NULL_CONDITIONS:
        raise ValueError(f"null_condition must be one of {NULL_CONDITIONS}, got {null_condition!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / "encoder.safetensors")
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, folder / "projector.safetensors")
    manifest = {
        "format": "cdgmae-sldm",
        "version": 1,
        "encoder": {
            "timm_name": encoder_name,
            "kwargs": encoder_kwargs or {},
            "weights": "encoder.safetensors",
            "input_size": int(encoder.patch_embed.img_size[0]),
            "mean": list(mean),
            "std": list(std),
            "embedding_norm": embedding_norm,
        },
        "projector": {
            "weights": "projector.safetensors",
            "in_features": projector.in_features,
            "out_features": projector.out_features,
        },
        "unet": "unet",
        "vae": "vae" if vae is not None else None,
        "scheduler": {"folder": "scheduler", "training": {k: scheduler.config[k] for k in SCHEDULE_KEYS}},
        "conditioning": {"null_condition": null_condition, "p_uncond": p_uncond},
    }
    (folder / SLDM_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def read_manifest(path: Path) -> dict:
    """The ``sldm.json`` of an S-LDM folder, checked to name every component."""
    manifest_path = path / SLDM_MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: missing S-LDM manifest (docs/sldm-format.md)")
    try:
        man = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise SLDMFolderError(f"{manifest_path}: not valid JSON ({err})") from None
    for key in MANIFEST_KEYS:
        if key not in man:
            raise SLDMFolderError(f"{manifest_path}: manifest lacks key {key!r}")
    return man


def validate_folder(path: Path) -> dict:
    """The manifest of an S-LDM folder whose every named file exists and whose scheduler has the
    noise schedule the UNet was trained with; raises naming the missing file or mismatched key."""
    man = read_manifest(path)
    needed = [man["encoder"]["weights"], man["projector"]["weights"], f"{man['unet']}/config.json"]
    needed += [f"{man['scheduler']['folder']}/scheduler_config.json"]
    needed += [f"{man['vae']}/config.json"] if man["vae"] else []
    for rel in needed:
        if not (path / rel).is_file():
            raise FileNotFoundError(f"{path / rel}: missing from the S-LDM folder (named in {SLDM_MANIFEST})")
    shipped = DDIMScheduler.load_config(path / man["scheduler"]["folder"])
    for key, trained in man["scheduler"]["training"].items():
        if shipped.get(key) != trained:
            raise SLDMFolderError(
                f"{path / man['scheduler']['folder']}: scheduler {key} = {shipped.get(key)!r}, but the UNet "
                f"was trained with {trained!r} ({SLDM_MANIFEST})"
            )
    if man["scheduler"]["training"].get("prediction_type") != "epsilon":
        raise SLDMFolderError(f"{path}: only epsilon-prediction UNets are sampled here ({SLDM_MANIFEST})")
    if man["conditioning"].get("null_condition") not in NULL_CONDITIONS:
        raise SLDMFolderError(f"{path / SLDM_MANIFEST}: conditioning.null_condition not in {NULL_CONDITIONS}")
    return man


@register("sldm")
class SLDMGenerator(ViewGenerator):
    """Self-supervised LDM: timm-ViT CLS embedding -> Linear -> one cross-attention token.

    CFG null condition (``null_condition``):
    - ``projected_zero``: projector(0) = its bias, i.e. the raw SSL embedding zeroed as in the
      Large-Image-Diffusion / PathLDM training recipe (``p_uncond`` drops the raw embedding);
    - ``zero_token``: an all-zero token after projection, as diffusers' image-variation pipeline.
    Sampling: DDIM, ``eps_cfg = eps_u + w (eps_c - eps_u)``; the VAE decodes in float32 to avoid the
    fp16 NaN (black image) failure mode.
    """

    def __init__(self, settings, image_size=96, device=None):
        super().__init__(settings, image_size, device)
        self.device = resolve_device(device)
        self.dtype = torch_dtype(self.settings.get("dtype", "float16"), self.device)
        path = model_dir(self.settings, self.name)
        self.manifest = man = validate_folder(path)
        # the CFG null token training used, unless the settings override it
        self.null_condition = self.settings.get("null_condition") or man["conditioning"]["null_condition"]
        self._load_encoder(path, man["encoder"], man["projector"])
        self.unet = UNet2DConditionModel.from_pretrained(path / man["unet"], local_files_only=True)
        self.vae = AutoencoderKL.from_pretrained(path / man["vae"], local_files_only=True) if man["vae"] else None
        self.scheduler = DDIMScheduler.from_pretrained(path / man["scheduler"]["folder"], local_files_only=True)
        self._check_shapes(path)
        self.encoder.to(self.device).eval()
        self.projector.to(self.device).eval()
        self.unet.to(self.device, self.dtype).eval()
        if self.vae is not None:
            self.vae.to(self.device, torch.float32).eval()

    def _check_shapes(self, path: Path) -> None:
        """The components fit together: projector -> UNet context, UNet channels -> VAE latents."""
        if self.unet.config.cross_attention_dim != self.projector.out_features:
            raise SLDMFolderError(
                f"{path}: projector width {self.projector.out_features} != UNet "
                f"cross_attention_dim {self.unet.config.cross_attention_dim}"
            )
        channels = self.vae.config.latent_channels if self.vae is not None else 3
        if self.unet.config.in_channels != channels:
            raise SLDMFolderError(
                f"{path}: UNet in_channels {self.unet.config.in_channels} != {channels} "
                f"({'VAE latent channels' if self.vae is not None else 'RGB, pixel space'})"
            )

    def _load_encoder(self, path: Path, enc: dict, pr: dict) -> None:
        """The timm ViT, its input size and normalization, and the Linear projector (on CPU)."""
        self.encoder = timm.create_model(
            enc["timm_name"], pretrained=False, num_classes=0, global_pool="token", **enc.get("kwargs", {})
        )
        self.encoder.load_state_dict(load_file(path / enc["weights"]), strict=True)
        self.enc_size = int(enc["input_size"])
        self.enc_norm = enc.get("embedding_norm", "none")
        self.mean = torch.tensor(enc["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(enc["std"]).view(1, 3, 1, 1)
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
        }
        return {**super().describe(), "manifest": self.manifest, "sampler": sampler}

    def embed(self, images: np.ndarray):
        """(B, H, W, 3) uint8 -> (B, D_enc) CLS embeddings (bicubic resize, mean/std normalized)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(self.enc_size, self.enc_size), mode="bicubic", align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).to(self.device)
        z = self.encoder(x)  # (B, D_enc): CLS token after the final norm
        if self.enc_norm == "l2":
            z = F.normalize(z, dim=-1)
        elif self.enc_norm == "standardize":  # RCG: per-sample mean/std over the feature dims
            z = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
        return z

    def conditions(self, images: np.ndarray, M: int):
        """Conditional and CFG-null cross-attention tokens, (B*M, 1, D_ctx) each, image-major."""
        z = self.embed(np.asarray(images))
        cond = self.projector(z).repeat_interleave(M, 0)[:, None]
        if self.null_condition == "projected_zero":
            null = self.projector(torch.zeros_like(z[:1]))[:, None].expand_as(cond)
        else:
            null = torch.zeros_like(cond)
        return cond.to(self.dtype), null.to(self.dtype)

    def denoise(self, latents, cond, null, gens: list) -> torch.Tensor:
        """DDIM from ``latents`` with classifier-free guidance ``eps_u + w (eps_c - eps_u)``."""
        s = self.settings
        w = float(s.get("guidance_scale", 6.0))
        self.scheduler.set_timesteps(int(s.get("steps", 50)), device=self.device)
        use_cfg = w != 1.0
        for t in self.scheduler.timesteps:
            inp = torch.cat([latents, latents]) if use_cfg else latents
            inp = self.scheduler.scale_model_input(inp, t)
            ctx = torch.cat([null, cond]) if use_cfg else cond
            eps = self.unet(inp, t, encoder_hidden_states=ctx).sample
            if use_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + w * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents, eta=float(s.get("eta", 0.0)), generator=gens).prev_sample
        return latents

    def generate(self, images, seeds):
        seeds = np.asarray(seeds, dtype=np.int64)
        B, M = seeds.shape
        with torch.inference_mode():
            cond, null = self.conditions(images, M)
            gens = cpu_generators(seeds)
            c = self.unet.config
            shape = (B * M, c.in_channels, c.sample_size, c.sample_size)
            latents = (
                randn_tensor(shape, generator=gens, device=torch.device(self.device), dtype=self.dtype)
                * self.scheduler.init_noise_sigma
            )
            latents = self.denoise(latents, cond, null, gens)
            if self.vae is not None:
                x = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
            else:  # pixel space: the UNet denoised the image itself, in [-1, 1]
                x = latents.float()
            x = (x / 2 + 0.5).clamp(0, 1)  # (B*M, 3, h, w), NaN kept
        arr = to_output(x.permute(0, 2, 3, 1), self.image_size)
        return arr.reshape(B, M, self.image_size, self.image_size, 3)
