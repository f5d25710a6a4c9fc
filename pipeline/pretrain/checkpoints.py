"""Checkpoint files of the pretraining stage: atomic saving, strict encoder loading, and the encoders
that are not pretraining outputs (random init, external MAE/CropMAE checkpoints).

Payload (docs/architecture.md): ``{"model", "optimizer", "scaler", "epoch", "step", "arch",
"img_size", "config"}``, loadable with ``torch.load(weights_only=True)``. Written with a recorded
content digest (``<name>.sha256``, ``pipeline.resume.save_torch_file``) that every loader verifies
(``verify_checkpoint``); another tool's checkpoint, which has none, is read unverified.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.io import verify_artefact
from pipeline.pretrain.models_mae import (
    ARCHS,
    CrossViewMAE,
    ViTEncoder,
    arch_name,
    build_encoder,
    parameter_counts,
    resolve_arch,
)
from pipeline.records import write_record
from pipeline.resume import UnsafeCheckpointError, safe_torch_load, save_torch_file
from pipeline.runtime import setup_logging
from pipeline.seeding import seed_everything

LOG = logging.getLogger("cdgmae.checkpoints")

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def verify_checkpoint(path: str | os.PathLike, external: bool | None = None, log: logging.Logger = LOG) -> str | None:
    """Check a checkpoint before it is read (``pipeline.io.verify_artefact``): one this workflow
    made (by default: under ``results/``) must match its recorded digest, and one without a record
    is an ``IntegrityError``; an external one (e.g. CropMAE's released weights) is checked against
    its digest if recorded, else by its zip records' CRCs, and the log says so."""
    digest = verify_artefact(path, external)
    if digest is None:
        log.info("%s: external checkpoint without a recorded digest: zip CRCs checked, read as given", path)
    return digest


# ---------------------------------------------------------------------------------------------
# loading


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


def infer_arch(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Match an encoder state dict to a registered arch by patch size, width and depth."""
    try:
        patch = state["patch_embed.proj.weight"].shape[-1]
        dim = state["cls_token"].shape[-1]
    except KeyError as err:
        raise KeyError(f"cannot infer the arch: encoder key {err} missing; pass arch=") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hits = [n for n, a in ARCHS.items() if (a["patch_size"], a["embed_dim"], a["depth"]) == (patch, dim, depth)]
    if len(hits) != 1:
        raise ValueError(
            f"cannot infer the arch (patch {patch}, dim {dim}, depth {depth}) from the "
            f"registry (matches: {hits}); pass arch="
        )
    return resolve_arch(hits[0])


# what reference training checkpoints pickle besides tensors (MAE / CropMAE save ``args``, an
# ``argparse.Namespace``): allowed by name, never a blanket ``weights_only=False``
REFERENCE_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def _read_checkpoint(path: str, external: bool | None = None) -> tuple[Mapping, dict[str, torch.Tensor]]:
    """(the whole checkpoint, its encoder state dict); every failure names the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    verify_checkpoint(path, external)
    try:
        ckpt = safe_torch_load(path, REFERENCE_CHECKPOINT_GLOBALS)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # corrupt or not a torch file
        raise RuntimeError(f"cannot load {path} with weights_only=True: {err}") from err
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    state = ckpt["model"] if "model" in ckpt else ckpt
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict found (expected ckpt['model'] or a dict of tensors)")
    return ckpt, encoder_state_dict(state)


def _load_strict(encoder: ViTEncoder, state: Mapping[str, torch.Tensor], path: str) -> int:
    """Copy every encoder key of ``state`` into ``encoder``; missing keys or shapes raise."""
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise KeyError(f"{path}: {len(missing)} of {len(expected)} encoder keys missing: {shown}")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: encoder shape mismatch: {'; '.join(bad[:8])}")
    encoder.load_state_dict({k: state[k] for k in expected}, strict=True)
    return len(expected)


def load_encoder(
    checkpoint_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    arch: str | Mapping | None = None,
    img_size: int | None = None,
    external: bool | None = None,
) -> ViTEncoder:
    """Encoder from our checkpoint payload, an MAE/CropMAE checkpoint, or an encoder-only state dict.

    arch / img_size: explicit > the checkpoint's ``arch`` / ``img_size`` > inferred from the weights.
    external: how the file is verified first (``verify_checkpoint``; None: by its location).
    Every encoder key must be present with the right shape (unlike the reference loader, which keeps
    missing weights random); decoder keys are ignored. Loads with ``weights_only=True``.
    """
    path = os.fspath(checkpoint_path)
    ckpt, state = _read_checkpoint(path, external)
    if arch is None:
        arch = ckpt.get("arch") if "model" in ckpt else None
        arch = resolve_arch(arch) if arch is not None else infer_arch(state)
    else:
        arch = resolve_arch(arch)
    if img_size is None:
        img_size = ckpt.get("img_size") if "model" in ckpt else None
        if img_size is None:
            if "pos_embed" not in state:
                raise KeyError(f"{path}: encoder key 'pos_embed' missing; cannot infer img_size")
            img_size = math.isqrt(state["pos_embed"].shape[1] - 1) * arch["patch_size"]
    encoder = build_encoder(arch, int(img_size))
    n = _load_strict(encoder, state, path)
    LOG.info("loaded %d encoder tensors from %s (arch %s, img_size %d)", n, path, arch_name(arch) or arch, img_size)
    return encoder.to(device).eval()


# ---------------------------------------------------------------------------------------------
# encoders that are not pretraining outputs: random init and external checkpoints


def mae_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full-model state dict in MAE's layout: the encoder's keys at the top level (``cls_token``,
    ``pos_embed``, ``patch_embed.proj.*``, ``blocks.*``, ``norm.*``) beside the decoder's, which is
    what CropMAE's evaluation and MAE's fine-tuning loaders read from ``ckpt["model"]``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("encoder.")
        if name in out:
            raise ValueError(f"mae_layout: {key!r} collides with a decoder key")
        out[name] = value
    return out


def _encoder_payload(encoder, arch, config: dict) -> dict:
    """Checkpoint payload of docs/architecture.md with encoder weights only (MAE key names)."""
    return {
        "model": encoder.state_dict(),
        "optimizer": None,
        "scaler": None,
        "epoch": 0,
        "step": 0,
        "arch": resolve_arch(arch),
        "img_size": int(encoder.img_size),
        "config": config,
    }


def init_random_encoder(arch: str, seed: int, output: str | Path, img_size: int = 224) -> None:
    """Randomly initialized encoder (the model's own init, seeded) saved as a checkpoint, so the
    random-init reference row is evaluated by the same ``propagate`` rule as trained encoders."""
    seed_everything(seed)
    encoder = build_encoder(arch, img_size)
    save_torch_file(_encoder_payload(encoder, arch, {"random_init_seed": seed, "arch": arch}), output)
    LOG.info("random-init %s (seed %d) -> %s", arch, seed, output)


def import_external_encoder(source: str | Path, arch: str, output: str | Path) -> None:
    """An MAE/CropMAE-format checkpoint converted to our payload; every encoder key must be there
    (``load_encoder`` raises naming the missing keys, unlike the reference's silent partial load)."""
    encoder = load_encoder(source, device="cpu", arch=arch, external=True)
    save_torch_file(_encoder_payload(encoder, arch, {"source": str(source), "arch": arch}), output)
    LOG.info("imported %s (%s) -> %s", source, arch, output)


# ---------------------------------------------------------------------------------------------
# CLI: init-random, import-external, describe


def init_random_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pretrain init-random", description="Save a seeded randomly initialized encoder."
    )
    parser.add_argument("--arch", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    init_random_encoder(args.arch, args.seed, args.output, args.img_size)
    settings = {"arch": args.arch, "seed": args.seed, "img_size": args.img_size}
    write_record(
        args.output,
        kind="checkpoint",
        command=("pretrain", "init-random"),
        settings=settings,
        device="cpu",
        precision="fp32",
    )


def import_external_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pretrain import-external",
        description="Convert an MAE/CropMAE encoder checkpoint to our payload (strict).",
    )
    parser.add_argument("--source", required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    setup_logging()
    import_external_encoder(args.source, args.arch, args.output)
    write_record(
        args.output,
        kind="checkpoint",
        command=("pretrain", "import-external"),
        inputs=[args.source],
        settings={"arch": args.arch},
    )


def describe_checkpoint(path: str, arch: str) -> dict:
    """Shape and parameter count of a checkpoint's encoder; ``arch`` only if the file names none."""
    try:
        encoder = load_encoder(path)
    except (KeyError, ValueError) as err:
        if "pass arch=" not in str(err):
            raise
        encoder = load_encoder(path, arch=arch)
    return {
        "checkpoint": path,
        "img_size": encoder.img_size,
        "patch_size": encoder.patch_size,
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "encoder_params": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
    }


def describe_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pretrain describe",
        description="Print an arch's parameter counts, or load a checkpoint's encoder and describe it.",
    )
    parser.add_argument("--arch", default="vit_small_patch16", choices=sorted(ARCHS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="our payload, an MAE/CropMAE checkpoint or "
        "an encoder state dict; --arch is used only if the file does not name one",
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.checkpoint:
        info = describe_checkpoint(args.checkpoint, args.arch)
    else:
        counts = parameter_counts(CrossViewMAE(args.arch, args.img_size))
        info = {
            "arch": args.arch,
            "img_size": args.img_size,
            **resolve_arch(args.arch),
            **{f"{k}_params": v for k, v in counts.items()},
        }
    print(json.dumps(info, indent=2))
