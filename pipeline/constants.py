"""Numeric constants more than one stage computes with, defined once (result-carrying: editing one
re-runs every job that normalises with it, ``pipeline.provenance``)."""

from __future__ import annotations

# ImageNet normalization of every encoder input (MAE, CropMAE, videowalk, timm's ViTs, the S-LDM's
# conditioning encoders)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
