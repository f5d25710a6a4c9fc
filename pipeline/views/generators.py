"""View generators for the bag of views, chosen by name from a small registry.

Every generator maps conditioning images and per-view seeds to views:

    gen.generate(images (B, H, W, 3) uint8, seeds (B, M) int64) -> (B, M, S, S, 3) float32 in [0, 1]

where S = ``image_size``. Each view depends only on (its conditioning image, its seed): every view
gets its own CPU ``torch.Generator`` / NumPy ``Generator``, so the result does not depend on the
batch it was generated in (diffusers "Reproducibility" guide; views-and-hdf5.md §4). The output is
float so that the caller can detect non-finite (fp16 NaN) views and regenerate them.

Registry:
- ``sd-variation``: diffusers ``StableDiffusionImageVariationPipeline`` from a local folder
  (CLIP image embedding as one cross-attention token, zero-token CFG).
- ``sldm``: a self-supervised LDM (Gen-SIS / RCG style): ``UNet2DConditionModel`` + ``AutoencoderKL``
  + ``DDIMScheduler`` conditioned on the CLS embedding of a timm ViT, projected by a Linear to one
  cross-attention token, with our own classifier-free-guidance loop. One local folder with a JSON
  manifest (``sldm.json``), written by :func:`save_sldm`.
- ``warp`` (BASELINE): weights-free pseudo-views (random perspective + elastic warp + crop).
- ``crop`` (BASELINE): CropMAE-style random resized crops of the real image.
``warp`` and ``crop`` set ``is_baseline = True``; their bags are never CDG-MAE diffusion views.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.devices import resolve_device
from pipeline.imaging import resize_square

LOG = logging.getLogger("cdgmae.generators")

GENERATORS: dict[str, Callable[..., ViewGenerator]] = {}
SLDM_MANIFEST = "sldm.json"


def register(name: str):
    def deco(cls):
        GENERATORS[name] = cls
        cls.name = name
        return cls

    return deco


def build_generator(
    name: str, settings: dict | None = None, image_size: int = 96, device: str | None = None
) -> ViewGenerator:
    """Instantiate the generator ``name`` with its ``views.generators.<name>`` settings."""
    if name not in GENERATORS:
        raise KeyError(f"unknown view generator {name!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[name](settings or {}, image_size=image_size, device=device)


class ViewGenerator:
    """Base class: subclasses implement ``_generate_one`` or override ``generate``."""

    name = "base"
    is_baseline = False
    # Bump when a code change alters the views a given (image, seed, settings) produces: it is part
    # of the part-file fingerprint, so stale parts are redone; cosmetic edits keep finished parts.
    version = 1

    def __init__(self, settings: dict, image_size: int = 96, device: str | None = None):
        self.settings = dict(settings)
        self.image_size = int(image_size)
        self.device = device

    def describe(self) -> dict:
        """Everything that determines the views, recorded as an HDF5 attribute."""
        return {"name": self.name, "is_baseline": self.is_baseline, "image_size": self.image_size, **self.settings}

    def generate(self, images: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        seeds = np.asarray(seeds, dtype=np.int64)
        B, M = seeds.shape
        out = np.empty((B, M, self.image_size, self.image_size, 3), np.float32)
        for b in range(B):
            for m in range(M):
                out[b, m] = self._generate_one(images[b], int(seeds[b, m]))
        return out

    def _generate_one(self, image: np.ndarray, seed: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


# ----------------------------------------------------------------------------- weights-free


@register("warp")
class WarpGenerator(ViewGenerator):
    """BASELINE pseudo-views: random perspective, smooth elastic displacement, random crop.

    Weights-free stand-in for diffusion views; warp-trained matching is known to generalise poorly
    (Truong et al., Warp Consistency), so results are labelled as a baseline everywhere.
    """

    is_baseline = True

    def _generate_one(self, image: np.ndarray, seed: int) -> np.ndarray:
        import cv2

        s = self.settings
        rng = np.random.default_rng(seed)
        img = resize_square(image, self.image_size).astype(np.float32) / 255.0
        S = self.image_size
        # perspective: jitter the 4 corners by up to `perspective` * S
        src = np.float32([[0, 0], [S - 1, 0], [S - 1, S - 1], [0, S - 1]])
        dst = src + rng.uniform(-1, 1, (4, 2)).astype(np.float32) * s.get("perspective", 0.12) * S
        H = cv2.getPerspectiveTransform(src, dst)
        img = cv2.warpPerspective(img, H, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        # elastic: Gaussian-smoothed random displacement field (Simard et al. 2003)
        alpha, sigma = s.get("elastic_alpha", 6.0), s.get("elastic_sigma", 8.0)
        if alpha > 0:
            d = rng.uniform(-1, 1, (2, S, S)).astype(np.float32)
            k = int(2 * math.ceil(3 * sigma) + 1)
            dx = cv2.GaussianBlur(d[0], (k, k), sigma) * alpha * S / 32
            dy = cv2.GaussianBlur(d[1], (k, k), sigma) * alpha * S / 32
            gy, gx = np.mgrid[0:S, 0:S].astype(np.float32)
            img = cv2.remap(img, gx + dx, gy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        # crop: a square of side sqrt(scale) * S at a random position, resized back
        lo, hi = s.get("crop_scale", [0.6, 1.0])
        side = max(2, int(round(math.sqrt(rng.uniform(lo, hi)) * S)))
        y0 = int(rng.integers(0, S - side + 1))
        x0 = int(rng.integers(0, S - side + 1))
        img = cv2.resize(img[y0 : y0 + side, x0 : x0 + side], (S, S), interpolation=cv2.INTER_LINEAR)
        return np.clip(img, 0.0, 1.0)


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with a NumPy generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: central crop clamped to the ratio range (as torchvision)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@register("crop")
class CropGenerator(ViewGenerator):
    """BASELINE: CropMAE-style random resized crops of the real image (no pose change)."""

    is_baseline = True

    def _generate_one(self, image: np.ndarray, seed: int) -> np.ndarray:
        import cv2

        rng = np.random.default_rng(seed)
        img = resize_square(image, self.image_size)
        top, left, h, w = random_resized_crop_box(
            rng,
            img.shape[0],
            img.shape[1],
            tuple(self.settings.get("scale", [0.3, 1.0])),
            tuple(self.settings.get("ratio", [0.75, 4 / 3])),
        )
        crop = img[top : top + h, left : left + w]
        out = cv2.resize(
            crop,
            (self.image_size, self.image_size),
            interpolation=cv2.INTER_CUBIC if h < self.image_size else cv2.INTER_AREA,
        )
        return out.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------- diffusion


def _torch_dtype(name: str, device: str):
    import torch

    if device == "cpu" and name != "float32":
        # half precision matmuls are slow or unsupported on CPU; results are float32 there
        LOG.info("dtype %s requested but running on CPU: using float32", name)
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _cpu_generators(seeds: np.ndarray) -> list:
    """One CPU torch.Generator per view, flattened in (image, view) order."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in np.asarray(seeds).reshape(-1)]


def _model_dir(settings: dict, name: str) -> Path:
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


def _to_output(views, image_size: int) -> np.ndarray:
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
        super().__init__(settings, image_size, device)
        import torch
        from diffusers import StableDiffusionImageVariationPipeline

        self.device = resolve_device(device)
        dtype = _torch_dtype(self.settings.get("dtype", "float16"), self.device)
        path = _model_dir(self.settings, self.name)
        # the safety checker would black out views; it is not part of the paper's generation
        self.pipe = StableDiffusionImageVariationPipeline.from_pretrained(
            path, local_files_only=True, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self._torch = torch

    def generate(self, images, seeds):
        from PIL import Image

        seeds = np.asarray(seeds, dtype=np.int64)
        B, M = seeds.shape
        s = self.settings
        with self._torch.inference_mode():
            out = self.pipe(
                image=[Image.fromarray(np.asarray(im)) for im in images],
                height=self.native,
                width=self.native,
                num_inference_steps=int(s.get("steps", 50)),
                guidance_scale=float(s.get("guidance_scale", 6.0)),
                eta=float(s.get("eta", 0.0)),
                num_images_per_prompt=M,
                generator=_cpu_generators(seeds),
                output_type="pt",
            ).images
        # (B*M, 3, h, w) ordered image-major (the pipeline repeats each embedding M times)
        arr = _to_output(out.permute(0, 2, 3, 1), self.image_size)
        return arr.reshape(B, M, self.image_size, self.image_size, 3)


# ---- S-LDM ------------------------------------------------------------------------------------


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
) -> Path:
    """Write an S-LDM folder in the layout :class:`SLDMGenerator` loads.

    Layout: ``unet/``, ``vae/``, ``scheduler/`` (diffusers ``save_pretrained``),
    ``encoder.safetensors`` (timm ViT state dict), ``projector.safetensors`` (Linear D_enc -> D_ctx)
    and ``sldm.json`` (timm name/kwargs of the encoder, its input size and normalisation).
    Used by the tests and to convert a Gen-SIS/RCG-style checkpoint once its weights are mapped.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
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
        "vae": "vae",
        "scheduler": "scheduler",
    }
    (folder / SLDM_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


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
        import timm
        import torch
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file

        self._torch = torch
        self.device = resolve_device(device)
        self.dtype = _torch_dtype(self.settings.get("dtype", "float16"), self.device)
        path = _model_dir(self.settings, self.name)
        manifest_path = path / SLDM_MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path}: missing S-LDM manifest (see save_sldm)")
        man = json.loads(manifest_path.read_text())
        for key in ("encoder", "projector", "unet", "vae", "scheduler"):
            if key not in man:
                raise KeyError(f"{manifest_path}: manifest lacks key {key!r}")
        self.manifest = man
        enc = man["encoder"]
        self.encoder = timm.create_model(
            enc["timm_name"], pretrained=False, num_classes=0, global_pool="token", **enc.get("kwargs", {})
        )
        self.encoder.load_state_dict(load_file(path / enc["weights"]), strict=True)
        self.enc_size = int(enc["input_size"])
        self.enc_norm = enc.get("embedding_norm", "none")
        self.mean = torch.tensor(enc["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(enc["std"]).view(1, 3, 1, 1)
        pr = man["projector"]
        self.projector = torch.nn.Linear(int(pr["in_features"]), int(pr["out_features"]))
        self.projector.load_state_dict(load_file(path / pr["weights"]), strict=True)
        self.unet = UNet2DConditionModel.from_pretrained(path / man["unet"], local_files_only=True)
        self.vae = AutoencoderKL.from_pretrained(path / man["vae"], local_files_only=True)
        self.scheduler = DDIMScheduler.from_pretrained(path / man["scheduler"], local_files_only=True)
        if self.unet.config.cross_attention_dim != self.projector.out_features:
            raise ValueError(
                f"{path}: projector width {self.projector.out_features} != UNet "
                f"cross_attention_dim {self.unet.config.cross_attention_dim}"
            )
        self.encoder.to(self.device).eval()
        self.projector.to(self.device).eval()
        self.unet.to(self.device, self.dtype).eval()
        self.vae.to(self.device, torch.float32).eval()
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def describe(self) -> dict:
        return {**super().describe(), "manifest": self.manifest}

    def embed(self, images: np.ndarray):
        """(B, H, W, 3) uint8 -> (B, D_enc) CLS embeddings (bicubic resize, mean/std normalised)."""
        torch = self._torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(self.enc_size, self.enc_size), mode="bicubic", align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).to(self.device)
        z = self.encoder(x)  # (B, D_enc): CLS token after the final norm
        if self.enc_norm == "l2":
            z = F.normalize(z, dim=-1)
        elif self.enc_norm == "standardize":  # RCG: per-sample mean/std over the feature dims
            z = (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
        return z

    def generate(self, images, seeds):
        torch = self._torch
        from diffusers.utils.torch_utils import randn_tensor

        seeds = np.asarray(seeds, dtype=np.int64)
        B, M = seeds.shape
        s = self.settings
        w = float(s.get("guidance_scale", 6.0))
        with torch.inference_mode():
            z = self.embed(np.asarray(images))
            cond = self.projector(z).repeat_interleave(M, 0)[:, None]  # (B*M, 1, D_ctx)
            if s.get("null_condition", "projected_zero") == "projected_zero":
                null = self.projector(torch.zeros_like(z[:1]))[:, None].expand_as(cond)
            else:
                null = torch.zeros_like(cond)
            cond, null = cond.to(self.dtype), null.to(self.dtype)
            gens = _cpu_generators(seeds)
            c = self.unet.config
            shape = (B * M, c.in_channels, c.sample_size, c.sample_size)
            latents = (
                randn_tensor(shape, generator=gens, device=torch.device(self.device), dtype=self.dtype)
                * self.scheduler.init_noise_sigma
            )
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
            x = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
            x = (x / 2 + 0.5).clamp(0, 1)  # (B*M, 3, h, w), NaN kept
        arr = _to_output(x.permute(0, 2, 3, 1), self.image_size)
        return arr.reshape(B, M, self.image_size, self.image_size, 3)


def main(argv=None) -> None:
    """List the registered generators (``python -m pipeline.views.generators``)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m pipeline.views.generators", description="View generator registry: list the names."
    )
    ap.parse_args(argv)
    for name, cls in sorted(GENERATORS.items()):
        kind = "BASELINE (weights-free)" if cls.is_baseline else "diffusion (local weights)"
        print(f"{name:<14}{kind:<28}{(cls.__doc__ or '').strip().splitlines()[0]}")


if __name__ == "__main__":
    main()
