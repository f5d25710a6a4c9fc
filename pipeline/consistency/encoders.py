"""Feature encoders for the consistency scores (paper §3.2), selected by name from a registry.

Every encoder maps a batch of square uint8 RGB images to
``TokenFeatures(global_tokens (B, C), patch_tokens (B, L, C), grid (h, w))`` where the patch tokens
are in **row-major spatial order** of the patch grid (token ``i * w + j`` = patch row ``i``, column
``j``). LS compares same-position tokens, so any shuffle (e.g. HF ``ViTMAEModel``'s random masking
with ``mask_ratio=0``) silently breaks it; the ViT encoders here use timm's / our own deterministic
forward, which never reorders tokens.

Registry (``consistency.encoder.name``):
- ``timm``: any timm ViT (default ``vit_base_patch16_224.mae``, the paper's MAE ViT-B/16), created
  with ``pretrained=False`` and loaded from a local checkpoint; global = [CLS], patches = final-norm
  patch tokens.
- ``cdgmae``: a checkpoint of our pretraining stage (``pipeline.pretrain.models_mae.load_encoder``).
- ``sift-grid`` / ``hog-grid``: weights-free dense descriptors on the patch grid (views-and-hdf5.md
  §10). ``centre = True``: the caller subtracts the dataset-mean descriptor (non-negative
  descriptors otherwise compress every cosine towards 1); global = mean-pooled patch descriptors.
  Plumbing/ordering checks only, never a stand-in for the paper's numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.devices import resolve_device

LOG = logging.getLogger("cdgmae.encoders")


ENCODERS: dict[str, Callable[..., FeatureEncoder]] = {}


def register_encoder(name: str):
    def wrap(builder):
        ENCODERS[name] = builder
        return builder

    return wrap


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


def build_encoder(settings: dict, device: str | None = None) -> FeatureEncoder:
    """Build the encoder named by ``settings["name"]`` (a resolved ``consistency.encoder`` section)."""
    name = settings["name"]
    if name not in ENCODERS:
        raise KeyError(f"consistency.encoder.name: unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name](settings, resolve_device(device))


def normalise_images(images, mean, std, device):
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised on ``device``."""
    import torch

    x = images.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------
# timm ViT from a local checkpoint
# --------------------------------------------------------------------------------------------

_DECODER_PREFIXES = ("decoder", "mask_token")  # MAE pretraining checkpoints carry the decoder too


def read_state_dict(path: str | Path, key: str = "consistency.encoder.checkpoint") -> dict:
    """State dict of an MAE-style ``{"model": ...}`` / ``{"state_dict": ...}`` or plain checkpoint."""
    import torch

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
    for k in ("model", "state_dict"):
        if isinstance(ckpt.get(k), dict):
            ckpt = ckpt[k]
            break
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def load_timm_checkpoint(model, path: str | Path) -> None:
    """Load ``path`` into a timm ViT; missing keys are an error, extra (decoder) keys are logged."""
    from timm.models.vision_transformer import checkpoint_filter_fn

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


class TimmViTEncoder(FeatureEncoder):
    def __init__(self, model_name: str, checkpoint: str | Path, image_size: int, device: str = "cpu"):
        import timm

        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size)
        load_timm_checkpoint(self.model, checkpoint)
        self.model.eval().to(device)
        cfg = self.model.pretrained_cfg or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self.image_size, self.device = image_size, device
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.name = f"timm:{model_name}"

    def encode(self, images) -> TokenFeatures:
        import torch

        with torch.inference_mode():
            x = normalise_images(images, self.mean, self.std, self.device)
            tokens = self.model.forward_features(x)  # (B, prefix + L, C), after the final norm
            prefix = self.model.num_prefix_tokens
            patches = tokens[:, prefix:]  # (B, L, C), row-major: timm flattens (h, w) without reorder
            has_cls = getattr(self.model, "cls_token", None) is not None
            glob = tokens[:, 0] if has_cls else patches.mean(1)  # (B, C)
        return TokenFeatures(glob.float(), patches.float(), self.grid)


@register_encoder("timm")
def _build_timm(settings: dict, device: str) -> FeatureEncoder:
    return TimmViTEncoder(settings["timm_model"], settings["checkpoint"], settings["image_size"], device)


# --------------------------------------------------------------------------------------------
# our own pretraining checkpoints
# --------------------------------------------------------------------------------------------


class CdgmaeEncoder(FeatureEncoder):
    """Encoder of a ``results/pretrain/{model}/checkpoint.pth`` via ``pipeline.pretrain.models_mae``."""

    def __init__(self, checkpoint: str | Path, image_size: int, device: str = "cpu"):
        from pipeline.pretrain.models_mae import load_encoder

        if checkpoint is None:
            raise ValueError("consistency.encoder.checkpoint is null: the cdgmae encoder needs one")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"consistency.encoder.checkpoint: not found: {checkpoint}")
        self.model = load_encoder(checkpoint, device=device).eval()
        self.image_size, self.device = image_size, device
        self.name = f"cdgmae:{checkpoint}"

    def encode(self, images) -> TokenFeatures:
        import torch

        with torch.inference_mode():
            x = normalise_images(images, IMAGENET_MEAN, IMAGENET_STD, self.device)
            tokens = self.model(x)  # (B, 1 + L, C) final-norm tokens, CLS first, no masking
            glob, patches = tokens[:, 0], tokens[:, 1:]  # (B, C), (B, L, C) row-major
            p = self.model.patch_size
            grid = (x.shape[-2] // p, x.shape[-1] // p)
        return TokenFeatures(glob.float(), patches.float(), grid)


@register_encoder("cdgmae")
def _build_cdgmae(settings: dict, device: str) -> FeatureEncoder:
    return CdgmaeEncoder(settings["checkpoint"], settings["image_size"], device)


# --------------------------------------------------------------------------------------------
# weights-free dense descriptors on the patch grid
# --------------------------------------------------------------------------------------------


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
        import cv2
        import torch

        arr = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
        desc = np.stack([self.describe(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)) for im in arr])
        patches = torch.from_numpy(desc).to(self.device)  # (B, L, D)
        return TokenFeatures(patches.mean(1), patches, self.grid)


class SiftGridEncoder(GridDescriptorEncoder):
    """OpenCV SIFT computed at fixed, upright keypoints centred on each patch cell."""

    kind = "sift-grid"

    def __init__(self, image_size: int, patch_size: int, device: str = "cpu"):
        import cv2

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
        from skimage.feature import hog

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


@register_encoder("sift-grid")
def _build_sift(settings: dict, device: str) -> FeatureEncoder:
    return SiftGridEncoder(settings["image_size"], settings["patch_size"], device)


@register_encoder("hog-grid")
def _build_hog(settings: dict, device: str) -> FeatureEncoder:
    return HogGridEncoder(settings["image_size"], settings["patch_size"], device)
