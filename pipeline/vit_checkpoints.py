"""The one reader of checkpoint files: verified and loaded as data (``read_checkpoint``), our
payload's encoder state dict, arch and img_size (``encoder_state_dict``, ``read_cdgmae_checkpoint``,
``strict_encoder_state``), and ViT encoders built from them: a timm / MAE / DINO checkpoint
(``load_timm_checkpoint``) or one of our CDG-MAE checkpoints in a timm ViT (``load_cdgmae_vit``).

A core module: the consistency scores and the S-LDM's conditioning encoder both read these, and
neither stage may import the pretraining stage (our checkpoint's encoder is read into a timm
``VisionTransformer`` of the same layout instead); the pretraining stage's own encoder loader
(``pipeline.pretrain.checkpoints.load_encoder``) reads through this module too. Errors name the
config ``key`` (where a path came from one) and the file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from pipeline.io import verify_artefact
from pipeline.resume import CorruptCheckpointError, UnsafeCheckpointError, safe_torch_load

LOG = logging.getLogger("cdgmae.vit_checkpoints")

_DECODER_PREFIXES = ("decoder", "mask_token")  # MAE pretraining checkpoints carry the decoder too
# what reference training checkpoints pickle besides tensors (MAE / CropMAE / DINO save ``args``, an
# ``argparse.Namespace``): allowed by name, never a blanket ``weights_only=False``
REFERENCE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def verify_checkpoint(path: str | os.PathLike, external: bool | None = None, log: logging.Logger = LOG) -> str | None:
    """Check a checkpoint before it is read (``pipeline.io.verify_artefact``): one this workflow
    made (by default: under ``results/``) must match its recorded digest, and one without a record
    is an ``IntegrityError``; an external one (e.g. CropMAE's released weights) is checked against
    its digest if recorded, else by its zip records' CRCs, and the log says so."""
    digest = verify_artefact(path, external)
    if digest is None:
        log.info("%s: external checkpoint without a recorded digest: zip CRCs checked, read as given", path)
    return digest


def read_checkpoint(path: str | os.PathLike | None, key: str | None = None, external: bool | None = None) -> dict:
    """The dict stored in a checkpoint file, verified first (``verify_checkpoint``) and loaded as
    data only (``weights_only``); every error names the file and ``key``, the config key the path
    came from (if any)."""
    where = f"{key}: " if key else ""
    if path is None:
        raise ValueError(f"{key or 'the checkpoint'} is null: this encoder needs a local checkpoint file")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}checkpoint not found: {path}")
    verify_checkpoint(path, external)
    try:
        ckpt = safe_torch_load(path, REFERENCE_CHECKPOINT_GLOBALS)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{where}{err}") from None
    except CorruptCheckpointError as err:  # its message names the file
        raise CorruptCheckpointError(f"{where}{err}") from None
    except Exception as err:  # not a torch file in any other way
        raise CorruptCheckpointError(f"{where}cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{where}{path} holds a {type(ckpt).__name__}, not a state dict")
    return ckpt


def read_state_dict(path: str | Path, key: str = "consistency.encoder.checkpoint") -> dict:
    """State dict of an MAE-style ``{"model": ...}`` / ``{"state_dict": ...}`` or plain checkpoint."""
    ckpt = read_checkpoint(path, key)
    for k in ("model", "state_dict"):
        if isinstance(ckpt.get(k), dict):
            ckpt = ckpt[k]
            break
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def load_timm_checkpoint(model, path: str | Path, key: str = "consistency.encoder.checkpoint") -> None:
    """Load ``path`` into a timm ViT; missing keys are an error, extra (decoder) keys are logged."""
    state = read_state_dict(path, key)
    dropped = [k for k in state if k.startswith(_DECODER_PREFIXES)]
    # a leftover MAE ``mask_token`` would make timm's filter treat the file as DINOv2
    state = {k: v for k, v in state.items() if not k.startswith(_DECODER_PREFIXES)}
    state = checkpoint_filter_fn(state, model)  # conv patch-embed, pos-embed resampled to img_size
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} encoder keys, e.g. {missing[:8]}")
    if dropped or unexpected:
        LOG.info("%s: ignored %d decoder and %d unexpected keys", path, len(dropped), len(unexpected))


# our pretraining stage's encoder keys (MAE layout), under ``encoder.`` in its checkpoints
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def encoder_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder entries of a full-model state dict: ours (``encoder.*``), MAE/CropMAE (top level).

    Wrapper prefixes of DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed first.
    """
    for wrapper in ("module.", "_orig_mod.", "module."):
        state = _strip_prefix(state, wrapper)
    if any(k.startswith("encoder.") for k in state):
        return {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


def payload_state_dict(ckpt: dict, path) -> dict[str, torch.Tensor]:
    """The encoder state dict of a checkpoint: our payload's / MAE's ``ckpt["model"]``, or the file's
    own dict of tensors (an encoder-only state dict)."""
    state = ckpt["model"] if "model" in ckpt else ckpt
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict found (expected ckpt['model'] or a dict of tensors)")
    return encoder_state_dict(state)


def grid_img_size(state: Mapping[str, torch.Tensor], patch_size: int, path) -> int:
    """The img_size of an encoder's square grid of patches, from its position embedding."""
    if "pos_embed" not in state:
        raise KeyError(f"{path}: encoder key 'pos_embed' missing; cannot infer img_size")
    return math.isqrt(state["pos_embed"].shape[1] - 1) * int(patch_size)


def strict_encoder_state(model: nn.Module, state: Mapping[str, torch.Tensor], path, pos_grid=None) -> dict:
    """The entries of ``state`` for every key of ``model`` (``pos_embed`` resampled to the patch
    grid ``pos_grid`` if given: timm's ``resample_abs_pos_embed``); a missing key or a shape that
    does not fit raises, naming the file (unlike the reference loader, which keeps missing weights
    random)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise KeyError(f"{path}: {len(missing)} of {len(expected)} encoder keys missing: {shown}")
    state = {k: state[k] for k in expected}
    if pos_grid is not None:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(pos_grid))
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: encoder shape mismatch: {'; '.join(bad[:8])}")
    return state


def read_cdgmae_checkpoint(path: str | Path, key: str = "consistency.encoder.checkpoint") -> tuple[dict, dict, int]:
    """(encoder state dict with MAE key names, arch dict, img_size) of our checkpoint payload.

    The payload is ``{"model": state dict, "arch": {patch_size, embed_dim, depth, num_heads, ...},
    "img_size": int}``; the encoder keys are ``encoder.``-prefixed in a full model and top-level in
    an encoder-only payload, and DDP / ``torch.compile`` wrapper prefixes are removed first.
    """
    ckpt = read_checkpoint(path, key)
    state = payload_state_dict(ckpt, path)
    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or any(k not in arch for k in ARCH_KEYS):
        raise ValueError(
            f"{path}: 'arch' must be a dict with keys {list(ARCH_KEYS)} (our checkpoints store "
            f"the resolved arch), got {arch!r}"
        )
    img_size = ckpt.get("img_size")
    if img_size is None:  # a square grid of patches, as our encoder is built
        img_size = grid_img_size(state, arch["patch_size"], path)
    return state, {k: int(arch[k]) for k in ARCH_KEYS}, int(img_size)


def cdgmae_vit(arch: dict, img_size: int) -> VisionTransformer:
    """A timm ViT whose ``forward_features`` is our encoder's forward: timm PatchEmbed and Blocks
    (mlp_ratio 4, qkv bias, LayerNorm eps 1e-6), cls token + pos_embed[:, :1], final LayerNorm."""
    return VisionTransformer(
        img_size=img_size,
        **{k: arch[k] for k in ARCH_KEYS},
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        weight_init="skip",  # every weight comes from the checkpoint
    )


def load_cdgmae_vit(
    path: str | Path, image_size: int, key: str = "consistency.encoder.checkpoint"
) -> VisionTransformer:
    """Our checkpoint in a timm ViT at ``image_size``, loaded strictly (every encoder key, right shapes).

    Built at the checkpoint's ``img_size`` when ``image_size`` equals it (then the forward is our
    encoder's, bit for bit); otherwise timm's ``resample_abs_pos_embed`` (bicubic, antialiased)
    resamples the stored position embedding to the ``image_size`` grid, which is not the DINO-style
    interpolation the pretraining stage applies to other input sizes.
    """
    state, arch, img_size = read_cdgmae_checkpoint(path, key)
    if image_size % arch["patch_size"]:
        size_key = key.rsplit(".", 1)[0] + ".image_size"
        raise ValueError(f"{size_key} {image_size} is not a multiple of patch_size {arch['patch_size']}")
    model = cdgmae_vit(arch, image_size)
    grid = model.patch_embed.grid_size if image_size != img_size else None
    state = strict_encoder_state(model, state, path, pos_grid=grid)
    model.load_state_dict(state, strict=True)
    LOG.info(
        "loaded %d encoder tensors from %s (arch %s, img_size %d -> %d)",
        len(state),
        path,
        arch,
        img_size,
        image_size,
    )
    return model
