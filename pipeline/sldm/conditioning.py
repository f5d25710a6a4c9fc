"""The S-LDM's conditioning encoder: a frozen timm ViT whose CLS embedding (after the final norm,
optionally ``l2`` or ``standardize``-d) conditions the UNet through a Linear projector.

``sldm.encoder.source`` (registry ``ENCODER_SOURCES``):
- ``timm``: a timm model name + a local checkpoint (DINO, MAE, ...; ``load_timm_checkpoint``);
- ``cdgmae``: one of our CDG-MAE checkpoints (``load_cdgmae_vit``), saved as the timm ViT of the
  same layout (``vit_base_patch16_224`` with the checkpoint's arch as kwargs);
- ``random-init``: a seeded, untrained timm ViT: the demo's stand-in for DINO (no weights are
  downloaded), labelled as such in ``sldm.json`` (``encoder.source``).

Whatever the source, the encoder is a ``timm.create_model(timm_name, num_classes=0,
global_pool="token", **kwargs)`` whose weights go into the folder, so the views stage's generator
rebuilds exactly the embeddings training conditioned on (``embed_images`` is shared by both).
An imported RCG folder adds MoCo v3's projection MLP after the CLS token (``projection_head``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import timm
import torch
import torch.nn.functional as F

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.registry import Registry
from pipeline.seeding import derive_seed
from pipeline.vit_checkpoints import load_cdgmae_vit, load_timm_checkpoint, read_cdgmae_checkpoint

EMBEDDING_NORMS = ("none", "l2", "standardize")
# source -> builder(settings: the resolved ``sldm.encoder`` section, seed) -> (timm_name, kwargs, model)
ENCODER_SOURCES = Registry("sldm.encoder.source")
CDGMAE_TIMM_NAME = "vit_base_patch16_224"  # its arch kwargs (patch, width, depth, heads) override the size
CHECKPOINT_KEY = "sldm.encoder.checkpoint"


def timm_vit(timm_name: str, kwargs: dict):
    """The encoder as the folder names it: no classifier head, CLS-token pooling."""
    return timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="token", **kwargs)


def normalize_embedding(z: torch.Tensor, norm: str) -> torch.Tensor:
    """``none``, ``l2`` (unit length) or ``standardize`` (RCG: per-sample mean/std over the features)."""
    if norm == "l2":
        return F.normalize(z, dim=-1)
    if norm == "standardize":
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6)
    if norm != "none":
        raise ValueError(f"embedding_norm must be one of {EMBEDDING_NORMS}, got {norm!r}")
    return z


def projection_head(dims) -> torch.nn.Sequential:
    """MoCo v3's projection MLP (the head RCG conditions on): per hidden layer Linear (no bias) ->
    BatchNorm1d -> ReLU, then Linear (no bias) -> BatchNorm1d without affine; ``dims`` = [in,
    hidden..., out]. Module indices follow that order, so MoCo's ``head.<i>.*`` keys load as is."""
    layers: list[torch.nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torch.nn.Linear(int(d_in), int(d_out), bias=False))
        last = i == len(dims) - 2
        layers += [torch.nn.BatchNorm1d(int(d_out), affine=not last)] + ([] if last else [torch.nn.ReLU()])
    return torch.nn.Sequential(*layers)


def head_dims(head: torch.nn.Sequential) -> list[int]:
    """The ``dims`` a ``projection_head`` was built with."""
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    return [linears[0].in_features] + [m.out_features for m in linears]


def embed_images(
    encoder, images, input_size: int, mean: torch.Tensor, std: torch.Tensor, norm: str, device, antialias: bool = True
):
    """(B, H, W, 3) uint8 -> (B, D_enc) CLS embeddings: bicubic resize (``antialias``: RCG's is
    not) to ``input_size``, [0, 1], ``mean`` / ``std`` (1, 3, 1, 1) normalized, then the
    ``encoder`` (a ViT, or a ViT then its ``projection_head``) and ``normalize_embedding``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False, antialias=antialias)
    x = ((x - mean) / std).to(device)
    return normalize_embedding(encoder(x), norm)  # encoder(x): CLS token after the final norm


@dataclass
class ConditioningEncoder:
    """A frozen timm ViT and how the folder records it (``save_sldm``'s encoder arguments)."""

    model: torch.nn.Module
    timm_name: str
    kwargs: dict
    source: str
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    embedding_norm: str = "none"
    _stats: tuple = field(default=(), repr=False)

    def __post_init__(self):
        self.model.requires_grad_(False).eval()
        self._stats = (torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1))

    @property
    def input_size(self) -> int:
        return int(self.model.patch_embed.img_size[0])

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    def to(self, device) -> ConditioningEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def embed(self, images: np.ndarray, device="cpu") -> torch.Tensor:
        return embed_images(self.model, images, self.input_size, *self._stats, self.embedding_norm, device)


@ENCODER_SOURCES.register("timm")
def _timm_source(settings: dict, seed: int):
    kwargs = {"img_size": settings["input_size"], **settings["kwargs"]}
    model = timm_vit(settings["timm_name"], kwargs)
    load_timm_checkpoint(model, settings["checkpoint"], key=CHECKPOINT_KEY)
    return settings["timm_name"], kwargs, model


@ENCODER_SOURCES.register("cdgmae")
def _cdgmae_source(settings: dict, seed: int):
    """Our checkpoint, moved into the timm model the folder can name (checked to load strictly)."""
    ours = load_cdgmae_vit(settings["checkpoint"], settings["input_size"], key=CHECKPOINT_KEY)
    _, arch, _ = read_cdgmae_checkpoint(settings["checkpoint"], key=CHECKPOINT_KEY)
    kwargs = {"img_size": settings["input_size"], **arch}
    model = timm_vit(CDGMAE_TIMM_NAME, kwargs)
    model.load_state_dict(ours.state_dict(), strict=True)
    return CDGMAE_TIMM_NAME, kwargs, model


@ENCODER_SOURCES.register("random-init")
def _random_source(settings: dict, seed: int):
    """A seeded untrained ViT (the demo's stand-in for DINO); the global RNG is left untouched."""
    kwargs = {"img_size": settings["input_size"], **settings["kwargs"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "sldm-encoder") % (1 << 62))
        model = timm_vit(settings["timm_name"], kwargs)
    return settings["timm_name"], kwargs, model


def build_conditioning_encoder(settings: dict, seed: int) -> ConditioningEncoder:
    """The frozen encoder of a resolved ``sldm.encoder`` section (``seed``: random-init only)."""
    if settings["embedding_norm"] not in EMBEDDING_NORMS:
        raise ValueError(f"sldm.encoder.embedding_norm must be one of {EMBEDDING_NORMS}")
    name, kwargs, model = ENCODER_SOURCES[settings["source"]](settings, seed)
    return ConditioningEncoder(
        model,
        name,
        kwargs,
        settings["source"],
        tuple(settings["mean"]),
        tuple(settings["std"]),
        settings["embedding_norm"],
    )
