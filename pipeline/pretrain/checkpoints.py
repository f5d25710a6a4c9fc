"""Checkpoint files of the pretraining stage: atomic saving, strict encoder loading, and the encoders
that are not pretraining outputs (random init, external MAE/CropMAE checkpoints).

Payload (docs/architecture.md): ``{"model", "optimizer", "scaler", "epoch", "step", "arch",
"img_size", "config"}``, loadable with ``torch.load(weights_only=True)``. Written with a recorded
content digest (``<name>.sha256``, ``pipeline.resume.save_torch_file``) that every loader verifies
(``verify_checkpoint``); another tool's checkpoint, which has none, is read unverified. Files are
read by the one reader of checkpoints, ``pipeline.vit_checkpoints``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

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
from pipeline.resume import save_torch_file
from pipeline.runtime import setup_logging
from pipeline.seeding import seed_everything
from pipeline.vit_checkpoints import grid_img_size, payload_state_dict, read_checkpoint, strict_encoder_state
from pipeline.vit_checkpoints import verify_checkpoint as verify_checkpoint  # re-exported: propagation's check

LOG = logging.getLogger("cdgmae.checkpoints")

# ---------------------------------------------------------------------------------------------
# loading


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


def _load_strict(encoder: ViTEncoder, state: Mapping[str, torch.Tensor], path: str) -> int:
    """Copy every encoder key of ``state`` into ``encoder``; missing keys or shapes raise."""
    checked = strict_encoder_state(encoder, state, path)
    encoder.load_state_dict(checked, strict=True)
    return len(checked)


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
    ckpt = read_checkpoint(path, external=external)
    state = payload_state_dict(ckpt, path)
    if arch is None:
        arch = ckpt.get("arch") if "model" in ckpt else None
        arch = resolve_arch(arch) if arch is not None else infer_arch(state)
    else:
        arch = resolve_arch(arch)
    if img_size is None:
        img_size = ckpt.get("img_size") if "model" in ckpt else None
        if img_size is None:
            img_size = grid_img_size(state, arch["patch_size"], path)
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
