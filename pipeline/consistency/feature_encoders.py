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

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import timm
import torch
from skimage.feature import hog

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.devices import resolve_device
from pipeline.registry import Registry
from pipeline.vit_checkpoints import load_cdgmae_vit, load_timm_checkpoint

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
