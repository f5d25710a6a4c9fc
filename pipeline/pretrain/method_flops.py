"""Training GFLOPs per sample and parameter counts of any cell, whatever its method — the
``results/mae_family_gflops.csv`` columns of the MAE-family table (``pipeline.table_registry``: ``mae_family``).

The counters are ``pipeline.pretrain.flops``'s (fvcore by default, Table 8's convention: GMACs of
one training forward up to the loss, Linear / conv / norm layers counted, attention products and
element-wise work not). Teachers are counted: their forward passes run inside the model's forward
(LUT's momentum encoder on both whole views and its projector; Pseudo MAE's two teachers on every
fold and the pseudo-labelling teacher's heads), so they are in the traced graph; EMA updates and the
optimizer are not part of a forward and cost nothing here. The count runs on a batch of 2 (LUT's
BatchNorm heads need more than one sample in train mode) and is divided by 2.

``analytic_gmacs`` is the same count written out by hand for the MAE family (the test oracle).

    python -m pipeline.pretrain method-flops --cells '[{"method": "lut", ...}, ...]' \\
        --settings '<pretrain JSON>' --output results/mae_family_gflops.csv
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from pipeline.cells import CELL_KEYS, cell_path
from pipeline.config import load_settings, section_defaults
from pipeline.pretrain.flops import METHODS, gmacs_per_sample, run_counting_cli
from pipeline.pretrain.models_mae import resolve_arch
from pipeline.pretrain.models_mae_family import MAE_FAMILY, build_pretrain_model, parameter_summary
from pipeline.pretrain.objectives import default_folds

LOG = logging.getLogger("cdgmae.method_flops")

COLUMNS = [*CELL_KEYS, "cell", "gflops", "params_m", "encoder_params_m", "teacher_params_m"]
BATCH = 2  # samples per counted forward (BatchNorm in train mode needs two)


def n_views(cell: dict, model) -> int:
    return model.n_views if cell["method"] in MAE_FAMILY else 1 + int(cell["anchors"])


def cell_costs(cell: dict, settings: dict, counter: str = "fvcore", seed: int = 0) -> dict:
    """GFLOPs (GMACs) per training sample and parameter counts (M) of one cell's model."""
    torch.manual_seed(seed)  # weights and masks do not change the count; fixed for determinism
    model = build_pretrain_model(cell, settings).train()
    gmacs = gmacs_per_sample(
        model, n_views(cell, model), settings["img_size"], cell["target_mask"], cell["anchor_mask"], counter, BATCH
    )
    counts = parameter_summary(model)
    return {
        **{k: cell[k] for k in CELL_KEYS},
        "cell": cell_path(cell),
        "gflops": round(gmacs, 6),
        "params_m": round(counts["trainable"] / 1e6, 6),
        "encoder_params_m": round(counts["encoder"] / 1e6, 6),
        "teacher_params_m": round(counts["teachers"] / 1e6, 6),
    }


# ---------------------------------------------------------------------------------------------
# the same count by hand (fvcore's conventions), for the MAE family


def _blocks(width: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """timm ``Block`` s: qkv (3 D^2) + proj (D^2) + MLP (2 r D^2) per token, two LayerNorms (5 D each)."""
    return depth * tokens * (width * width * (4 + 2 * mlp_ratio) + 10 * width)


def _encoder(a: dict, tokens: int) -> float:
    """ViT blocks and final LayerNorm on ``tokens`` tokens (cls included)."""
    return _blocks(a["embed_dim"], a["depth"], tokens) + 5 * a["embed_dim"] * tokens


def _embed(a: dict, n_patches: int) -> float:
    return n_patches * 3 * a["patch_size"] ** 2 * a["embed_dim"]  # the patch-embedding conv, every patch


def _decoder(a: dict, visible: int, n_patches: int, out_dim: int) -> float:
    dec, tokens = a["decoder_embed_dim"], n_patches + 1
    return (
        visible * a["embed_dim"] * dec  # decoder_embed on cls + visible tokens
        + _blocks(dec, a["decoder_depth"], tokens)
        + 5 * dec * tokens  # decoder_norm
        + tokens * dec * out_dim  # decoder_pred (cls row included, dropped after)
    )


def analytic_gmacs(cell: dict, settings: dict) -> float:
    """GMACs per sample of ``mae`` / ``lut`` / ``pseudo-mae`` written out (fvcore's rules: Linear
    in x out per row, conv per output element, LayerNorm and train-mode BatchNorm 5 per element,
    eval-mode BatchNorm 2; attention products, pooling, normalisation, Sinkhorn and the nearest-patch
    matching uncounted)."""
    a = resolve_arch(cell["arch"])
    D, p = a["embed_dim"], a["patch_size"]
    L = (settings["img_size"] // p) ** 2
    keep = int(L * (1 - cell["target_mask"]))
    method = cell["method"]
    if method == "mae":
        total = _embed(a, L) + _encoder(a, keep + 1) + _decoder(a, keep + 1, L, 3 * p * p)
    elif method == "lut":
        H = settings["lut"]["head_mlp_dim"]
        mlp_train, mlp_eval = 2 * D * H + 5 * H, 2 * D * H + 2 * H  # Linear-BN-ReLU-Linear on a pooled vector
        student = 2 * _embed(a, L) + 2 * _encoder(a, keep + 1) + _decoder(a, keep + 1, L, 3 * p * p) + 2 * 2 * mlp_train
        teacher = 2 * _embed(a, L) + 2 * _encoder(a, L + 1) + 2 * mlp_eval
        total = student + teacher
    elif method == "pseudo-mae":
        s = settings["pseudo_mae"]
        K = s["folds"] or default_folds(L, keep)
        masked = L - keep
        sizes = [masked // K + (1 if i < masked % K else 0) for i in range(K)]  # torch.tensor_split
        hh, bn, out = s["head_hidden"], s["head_bottleneck"], s["out_dim"]
        head = D * hh + hh * hh + hh * bn + bn * out  # per row
        student = _embed(a, L) + _encoder(a, keep + 1) + _decoder(a, keep + 1, L, D) + (masked + 1) * head
        folds = sum(_encoder(a, n + 1) for n in sizes)
        teachers = 2 * (_embed(a, L) + folds) + (masked + K) * head
        total = student + teachers
    else:
        raise KeyError(f"analytic_gmacs covers {MAE_FAMILY}, not {method!r}")
    return total / 1e9


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.pretrain method-flops", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cells", required=True, help="JSON list of canonical cells (pipeline.cells)")
    parser.add_argument("--settings", default=None, help="pretrain config section (JSON string or file)")
    parser.add_argument("--output", required=True, help=f"CSV with columns {','.join(COLUMNS)}")
    parser.add_argument("--counter", choices=sorted(METHODS), default="fvcore")
    run_counting_cli(parser, argv, count_cells, COLUMNS)


def count_cells(args) -> list[dict]:
    """``cell_costs`` of every cell of ``--cells`` under the ``--settings`` pretrain section."""
    settings = section_defaults("pretrain", overrides=load_settings(args.settings))
    rows = []
    for cell in json.loads(args.cells):
        rows.append(cell_costs(cell, settings, args.counter))
        LOG.info(
            "%s: %.4f GMACs, %.3f M trainable, %.3f M teacher parameters",
            rows[-1]["cell"],
            rows[-1]["gflops"],
            rows[-1]["params_m"],
            rows[-1]["teacher_params_m"],
        )
    return rows
