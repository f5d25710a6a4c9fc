"""Feature encoders for the consistency scores (paper §3.2), selected by name from a registry.

Every encoder maps a batch of square uint8 RGB images to
``TokenFeatures(global_tokens (B, C), patch_tokens (B, L, C), grid (h, w))`` where the patch tokens
are in **row-major spatial order** of the patch grid (token ``i * w + j`` = patch row ``i``, column
``j``). LS compares same-position tokens, so any shuffle (e.g. HF ``ViTMAEModel``'s random masking
with ``mask_ratio=0``) silently breaks it; the ViT encoders here use timm's deterministic forward,
which never reorders tokens.

Registry ``ENCODERS`` (``consistency.encoder.name``):
- ``timm``: any timm ViT (default ``vit_base_patch16_224.mae``, the paper's MAE ViT-B/16), created
  with ``pretrained=False`` and loaded from a local checkpoint; global = [CLS], patches = final-norm
  patch tokens.
- ``cdgmae``: a checkpoint of our pretraining stage, read into a timm ``VisionTransformer`` of the
  same layout (our encoder is MAE's: timm patch embedding and blocks, final LayerNorm), so this stage
  does not import the later pretraining stage.
- ``sift-grid`` / ``hog-grid``: weights-free dense descriptors on the patch grid (views-and-hdf5.md
  §10). ``centre = True``: the caller subtracts the dataset-mean descriptor (non-negative
  descriptors otherwise compress every cosine towards 1); global = mean-pooled patch descriptors.
  Plumbing/ordering checks only, never a stand-in for the paper's numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
import torch.nn as nn
from skimage.feature import hog
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.devices import resolve_device
from pipeline.registry import Registry

LOG = logging.getLogger("cdgmae.encoders")

# name -> builder(settings: resolved ``consistency.encoder`` section, device: str) -> FeatureEncoder
ENCODERS = Registry("consistency.encoder.name")


@dataclass
class TokenFeatures:
    global_tokens: torch.Tensor  # (B, C) float32
    patch_tokens: torch.Tensor  # (B, L, C) float32, L = h * w, row-major over the patch grid
    grid: tuple[int, int]  # (h, w)


class FeatureEncoder:
    """Base class: ``encode(images)`` with ``images`` a (B, S, S, 3) uint8 tensor, S = image_size."""

    name: str = "encoder"  # label written to the tables' ``encoder`` column
    image_size: int = 224
    centre: bool = False  # subtract the dataset-mean patch descriptor before cosines
    device: str = "cpu"

    def encode(self, images) -> TokenFeatures:  # pragma: no cover - interface
        raise NotImplementedError


def build_feature_encoder(settings: dict, device: str | None = None) -> FeatureEncoder:
    """Build the encoder named by ``settings["name"]`` (a resolved ``consistency.encoder`` section)."""
    return ENCODERS[settings["name"]](settings, resolve_device(device))


def normalize_images(images, mean, std, device):
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalized on ``device``."""
    x = images.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# timm ViTs: a timm checkpoint, or one of ours


class ViTFeatureEncoder(FeatureEncoder):
    """A timm ViT (eval mode on ``device``): global = [CLS] (or mean patch), patches = final-norm tokens."""

    def __init__(self, model, name: str, image_size: int, device: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model = model.eval().to(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size, self.device, self.name = image_size, device, name
        self.grid = tuple(self.model.patch_embed.grid_size)

    def encode(self, images) -> TokenFeatures:
        with torch.inference_mode():
            x = normalize_images(images, self.mean, self.std, self.device)
            tokens = self.model.forward_features(x)  # (B, prefix + L, C), after the final norm
            prefix = self.model.num_prefix_tokens
            patches = tokens[:, prefix:]  # (B, L, C), row-major: timm flattens (h, w) without reorder
            has_cls = getattr(self.model, "cls_token", None) is not None
            glob = tokens[:, 0] if has_cls else patches.mean(1)  # (B, C)
        return TokenFeatures(glob.float(), patches.float(), self.grid)


_DECODER_PREFIXES = ("decoder", "mask_token")  # MAE pretraining checkpoints carry the decoder too


def _torch_load(path: str | Path | None, key: str = "consistency.encoder.checkpoint") -> dict:
    """The dict stored in a local checkpoint file (``weights_only``); errors name ``key`` and the file."""
    if path is None:
        raise ValueError(f"{key} is null: this encoder needs a local checkpoint file")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / not a torch file
        raise ValueError(f"{key}: cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{key}: {path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def read_state_dict(path: str | Path, key: str = "consistency.encoder.checkpoint") -> dict:
    """State dict of an MAE-style ``{"model": ...}`` / ``{"state_dict": ...}`` or plain checkpoint."""
    ckpt = _torch_load(path, key)
    for k in ("model", "state_dict"):
        if isinstance(ckpt.get(k), dict):
            ckpt = ckpt[k]
            break
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def load_timm_checkpoint(model, path: str | Path) -> None:
    """Load ``path`` into a timm ViT; missing keys are an error, extra (decoder) keys are logged."""
    state = read_state_dict(path)
    dropped = [k for k in state if k.startswith(_DECODER_PREFIXES)]
    # a leftover MAE ``mask_token`` would make timm's filter treat the file as DINOv2
    state = {k: v for k, v in state.items() if not k.startswith(_DECODER_PREFIXES)}
    state = checkpoint_filter_fn(state, model)  # conv patch-embed, pos-embed resampled to img_size
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} encoder keys, e.g. {missing[:8]}")
    if dropped or unexpected:
        LOG.info("%s: ignored %d decoder and %d unexpected keys", path, len(dropped), len(unexpected))


class TimmViTEncoder(ViTFeatureEncoder):
    def __init__(self, model_name: str, checkpoint: str | Path, image_size: int, device: str = "cpu"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size)
        load_timm_checkpoint(model, checkpoint)
        cfg = model.pretrained_cfg or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        super().__init__(model, f"timm:{model_name}", image_size, device, mean, std)


@ENCODERS.register("timm")
def _build_timm(settings: dict, device: str) -> FeatureEncoder:
    return TimmViTEncoder(settings["timm_model"], settings["checkpoint"], settings["image_size"], device)


# our pretraining stage's encoder keys (MAE layout), under ``encoder.`` in its checkpoints
_CDGMAE_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
_CDGMAE_ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")


def _strip_wrapper(state: dict, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_cdgmae_checkpoint(path: str | Path) -> tuple[dict, dict, int]:
    """(encoder state dict with MAE key names, arch dict, img_size) of our checkpoint payload.

    The payload is ``{"model": state dict, "arch": {patch_size, embed_dim, depth, num_heads, ...},
    "img_size": int}``; the encoder keys are ``encoder.``-prefixed in a full model and top-level in
    an encoder-only payload, and DDP / ``torch.compile`` wrapper prefixes are removed first.
    """
    ckpt = _torch_load(path)
    state = ckpt["model"] if "model" in ckpt else ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict found (expected ckpt['model'] or a dict of tensors)")
    for wrapper in ("module.", "_orig_mod.", "module."):
        state = _strip_wrapper(state, wrapper)
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    else:
        state = {k: v for k, v in state.items() if k.startswith(_CDGMAE_PREFIXES)}
    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or any(k not in arch for k in _CDGMAE_ARCH_KEYS):
        raise ValueError(
            f"{path}: 'arch' must be a dict with keys {list(_CDGMAE_ARCH_KEYS)} (our checkpoints store "
            f"the resolved arch), got {arch!r}"
        )
    img_size = ckpt.get("img_size")
    if img_size is None:  # a square grid of patches, as our encoder is built
        if "pos_embed" not in state:
            raise KeyError(f"{path}: encoder key 'pos_embed' missing; cannot infer img_size")
        img_size = math.isqrt(state["pos_embed"].shape[1] - 1) * int(arch["patch_size"])
    return state, {k: int(arch[k]) for k in _CDGMAE_ARCH_KEYS}, int(img_size)


def cdgmae_vit(arch: dict, img_size: int) -> VisionTransformer:
    """A timm ViT whose ``forward_features`` is our encoder's forward: timm PatchEmbed and Blocks
    (mlp_ratio 4, qkv bias, LayerNorm eps 1e-6), cls token + pos_embed[:, :1], final LayerNorm."""
    return VisionTransformer(
        img_size=img_size,
        **{k: arch[k] for k in _CDGMAE_ARCH_KEYS},
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        weight_init="skip",  # every weight comes from the checkpoint
    )


def load_cdgmae_vit(path: str | Path, image_size: int) -> VisionTransformer:
    """Our checkpoint in a timm ViT at ``image_size``, loaded strictly (every encoder key, right shapes).

    Built at the checkpoint's ``img_size`` when ``image_size`` equals it (then the forward is our
    encoder's, bit for bit); otherwise timm's ``resample_abs_pos_embed`` (bicubic, antialiased)
    resamples the stored position embedding to the ``image_size`` grid, which is not the DINO-style
    interpolation the pretraining stage applies to other input sizes.
    """
    state, arch, img_size = read_cdgmae_checkpoint(path)
    if image_size % arch["patch_size"]:
        raise ValueError(
            f"consistency.encoder.image_size {image_size} is not a multiple of patch_size {arch['patch_size']}"
        )
    model = cdgmae_vit(arch, image_size)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise KeyError(f"{path}: {len(missing)} of {len(expected)} encoder keys missing: {shown}")
    state = {k: state[k] for k in expected}
    if image_size != img_size:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(model.patch_embed.grid_size))
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: encoder shape mismatch: {'; '.join(bad[:8])}")
    model.load_state_dict(state, strict=True)
    LOG.info(
        "loaded %d encoder tensors from %s (arch %s, img_size %d -> %d)",
        len(expected),
        path,
        arch,
        img_size,
        image_size,
    )
    return model


class CdgmaeEncoder(ViTFeatureEncoder):
    """Encoder of a ``results/pretrain/{model}/checkpoint.pth`` as a timm ViT (``load_cdgmae_vit``)."""

    def __init__(self, checkpoint: str | Path, image_size: int, device: str = "cpu"):
        if checkpoint is None:
            raise ValueError("consistency.encoder.checkpoint is null: the cdgmae encoder needs one")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"consistency.encoder.checkpoint: not found: {checkpoint}")
        model = load_cdgmae_vit(checkpoint, image_size)
        super().__init__(model, f"cdgmae:{checkpoint}", image_size, device)


@ENCODERS.register("cdgmae")
def _build_cdgmae(settings: dict, device: str) -> FeatureEncoder:
    return CdgmaeEncoder(settings["checkpoint"], settings["image_size"], device)


# --------------------------------------------------------------------------------------------
# weights-free dense descriptors on the patch grid


class GridDescriptorEncoder(FeatureEncoder):
    """One hand-crafted descriptor per ``patch_size`` cell, in row-major grid order."""

    centre = True
    kind = "grid"

    def __init__(self, image_size: int, patch_size: int, device: str = "cpu"):
        if image_size % patch_size:
            raise ValueError(
                f"consistency.encoder.image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        self.image_size, self.patch_size, self.device = image_size, patch_size, device
        self.grid = (image_size // patch_size,) * 2
        self.name = f"{self.kind} (weights-free, {patch_size}px cells, mean-centred)"

    def describe(self, gray: np.ndarray) -> np.ndarray:  # (S, S) uint8 -> (L, D) float32
        raise NotImplementedError

    def encode(self, images) -> TokenFeatures:
        arr = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
        desc = np.stack([self.describe(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)) for im in arr])
        patches = torch.from_numpy(desc).to(self.device)  # (B, L, D)
        return TokenFeatures(patches.mean(1), patches, self.grid)


class SiftGridEncoder(GridDescriptorEncoder):
    """OpenCV SIFT computed at fixed, upright keypoints centred on each patch cell."""

    kind = "sift-grid"

    def __init__(self, image_size: int, patch_size: int, device: str = "cpu"):
        super().__init__(image_size, patch_size, device)
        self.sift = cv2.SIFT_create()
        p, (h, w) = patch_size, self.grid
        centres = [((j + 0.5) * p, (i + 0.5) * p) for i in range(h) for j in range(w)]
        # OpenCV's descriptor window spans 4 bins of 1.5 * size px each: size = p / 6 makes the
        # window the patch cell itself (dense-SIFT convention), so a token describes its own patch
        self.keypoints = [cv2.KeyPoint(float(x), float(y), p / 6.0, 0.0) for x, y in centres]
        self.centres = np.asarray(centres, dtype=np.float32)

    def describe(self, gray: np.ndarray) -> np.ndarray:
        kps, desc = self.sift.compute(gray, self.keypoints)
        pts = np.asarray([k.pt for k in kps], dtype=np.float32)
        if desc is None or len(kps) != len(self.keypoints) or not np.allclose(pts, self.centres):
            raise RuntimeError("SIFT dropped or reordered grid keypoints")
        return desc.astype(np.float32)  # (L, 128)


class HogGridEncoder(GridDescriptorEncoder):
    """scikit-image HOG: 9 orientations, 2x2 cells of patch_size/2 per patch = one 36-d block."""

    kind = "hog-grid"

    def __init__(self, image_size: int, patch_size: int, device: str = "cpu"):
        if patch_size % 2:
            raise ValueError(f"hog-grid needs an even patch_size, got {patch_size}")
        super().__init__(image_size, patch_size, device)

    def describe(self, gray: np.ndarray) -> np.ndarray:
        half = self.patch_size // 2
        blocks = hog(
            gray,
            orientations=9,
            pixels_per_cell=(half, half),
            cells_per_block=(2, 2),
            block_norm="L2-Hys",
            feature_vector=False,
        )  # (2h-1, 2w-1, 2, 2, 9), stride half
        blocks = blocks[::2, ::2]  # (h, w, 2, 2, 9): the blocks that tile the patch grid exactly
        return blocks.reshape(self.grid[0] * self.grid[1], -1).astype(np.float32)  # (L, 36)


@ENCODERS.register("sift-grid")
def _build_sift(settings: dict, device: str) -> FeatureEncoder:
    return SiftGridEncoder(settings["image_size"], settings["patch_size"], device)


@ENCODERS.register("hog-grid")
def _build_hog(settings: dict, device: str) -> FeatureEncoder:
    return HogGridEncoder(settings["image_size"], settings["patch_size"], device)
