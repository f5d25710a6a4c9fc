"""Command-line pieces shared by the ``neighbours``, ``table1`` and ``table9`` commands: the common
flags, the resolved ``consistency`` section, the encoder and the pretraining image list.

A module of its own so that ``table1`` / ``table9`` need not import the ``neighbours`` command's module.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.cli import command_parser
from pipeline.config import add_runtime_flags, apply_runtime_flags, load_settings, result_neutral_keys, section_defaults
from pipeline.consistency.feature_encoders import FeatureEncoder, build_feature_encoder
from pipeline.consistency.sources import ImageListSource
from pipeline.data.readers import list_imagenet
from pipeline.devices import set_threads
from pipeline.runtime import setup_logging

LOG = logging.getLogger("cdgmae.consistency")


def scoring_parser(command: str, description: str) -> argparse.ArgumentParser:
    """Parser of ``python -m pipeline.consistency <command>`` with the flags every command takes."""
    p = command_parser("consistency", command, description)
    p.add_argument(
        "--settings", help="consistency config section (JSON string or file); missing keys take the schema defaults"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads")
    p.add_argument("--batch-size", type=int, default=None, help="override encoder.batch_size")
    add_runtime_flags(p, "consistency")
    return p


def start(args) -> None:
    """Logging and CPU threads, once the arguments are parsed."""
    setup_logging()
    set_threads(args.threads)


def resolve_section(args) -> dict:
    """The consistency section from ``--settings`` (partial) + schema defaults + CLI overrides of
    the output-invariant knobs (Snakemake passes those as resources, so they trigger no rerun)."""
    cfg = apply_runtime_flags(
        args, "consistency", section_defaults("consistency", overrides=load_settings(args.settings))
    )
    if args.batch_size is not None:
        cfg["encoder"]["batch_size"] = args.batch_size
    return cfg


def encoder_checkpoint(cfg: dict) -> str | None:
    """The weights file the configured encoder reads (timm / cdgmae), else None."""
    return cfg["encoder"].get("checkpoint") if cfg["encoder"]["name"] in ("timm", "cdgmae") else None


def scoring_settings(cfg: dict, args, sources=None) -> dict:
    """What a consistency output was computed with: the section (runtime knobs and the Table 9
    generator list aside), the seed, the run label and the named sources."""
    drop = {*result_neutral_keys("consistency"), "generators"}
    return {
        "consistency": {k: v for k, v in cfg.items() if k not in drop},
        "seed": getattr(args, "seed", None),
        "run_label": getattr(args, "run_label", None),
        "sources": sources,
    }


def open_encoder(cfg: dict, device: str | None) -> FeatureEncoder:
    """The feature encoder of a resolved consistency section, on ``device``."""
    encoder = build_feature_encoder(cfg["encoder"], device)
    LOG.info("encoder %s on %s", encoder.name, encoder.device)
    return encoder


def list_images(root) -> ImageListSource:
    """The pretraining images of an ImageNet-layout root, in global-index order."""
    return ImageListSource(list_imagenet(root))
