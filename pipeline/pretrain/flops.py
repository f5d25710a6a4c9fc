"""Training GFLOPs per sample of each (N anchors, anchor mask) cell — the paper's Table 8 column.

Convention (spec model-and-training.md §11, the usual one in MAE-family papers): fvcore's
``FlopCountAnalysis`` total for one sample, forward pass up to the loss, i.e.

* one multiply-add = 1 (the paper's "GFLOPs" are GMACs); Linear and conv counted, LayerNorm 5·numel;
* attention QK^T and AV products not counted, whatever kernel runs them: fused
  (``scaled_dot_product_attention``, which fvcore skips, as it skips softmax, GELU and the loss) or
  unfused (``TIMM_FUSED_ATTN=0``: ``matmul`` / ``bmm``, whose handles are removed here; every
  Linear layer is ``aten::linear`` / ``addmm`` and stays counted);
* the patch-embed conv runs on every patch of every view (masking happens after embedding);
  masked tokens are dropped at the encoder input and cost nothing.

At ViT-S/16, 224 px, r_t = 0.9 this reproduces all eight Table 8 cells within 0.05.

``--method flopcounter`` is an independent count with ``torch.utils.flop_counter.FlopCounterMode``
(addmm/mm/convolution FLOPs / 2 + 5·numel per LayerNorm, model in train mode so that
``nn.MultiheadAttention`` does not take its eval fast path, which the counter cannot see); it agrees
with fvcore and needs no TorchScript tracing.

    python -m pipeline.pretrain flops --output results/gflops.csv [--arch vit_small_patch16 --img-size 224 \
        --target-mask 0.9 --cells "1:0,2:0,2:0.25,2:0.5,3:0.25,3:0.5,4:0.25,4:0.5"]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.devices import set_threads
from pipeline.io import write_csv_atomic
from pipeline.pretrain.models_mae import CrossViewMAE
from pipeline.runtime import setup_logging

LOG = logging.getLogger("cdgmae.flops")

TABLE8_CELLS = "1:0,2:0,2:0.25,2:0.5,3:0.25,3:0.5,4:0.25,4:0.5"
# the ops an unfused attention computes QK^T and AV with: not counted, by the paper's convention
ATTENTION_PRODUCT_OPS = ("aten::matmul", "aten::bmm", "aten::baddbmm")


def parse_cells(text: str) -> list[tuple[int, float]]:
    """ "1:0,2:0.25" -> [(1, 0.0), (2, 0.25)]; anchor masks as fractions (0.25, not 25)."""
    cells = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            n, ratio = item.split(":")
            cell = (int(n), float(ratio))
        except ValueError:
            raise ValueError(f"--cells: bad item {item!r}; expected ANCHORS:ANCHOR_MASK, e.g. 2:0.25") from None
        if cell[0] < 1 or not 0.0 <= cell[1] < 1.0:
            raise ValueError(f"--cells: {item!r} needs ANCHORS >= 1 and 0 <= ANCHOR_MASK < 1")
        cells.append(cell)
    if not cells:
        raise ValueError("--cells: no cells given")
    return cells


class _LossOnly(nn.Module):
    """Wraps the model so that tracing sees one tensor in, the loss out, with fixed mask ratios."""

    def __init__(self, model: nn.Module, target_mask: float, anchor_mask: float):
        super().__init__()
        self.model, self.target_mask, self.anchor_mask = model, target_mask, anchor_mask

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.model(views, self.target_mask, self.anchor_mask)[0]


def _no_macs(inputs, outputs) -> int:
    return 0


def gmacs_fvcore(model: nn.Module, views: torch.Tensor, target_mask: float, anchor_mask: float) -> float:
    """fvcore FlopCountAnalysis total (GMACs) of one forward pass on ``views`` (1, 1+N, 3, H, W)."""
    # imported here: callers of parse_cells / the flopcounter method (bench.gpu_suite on an image
    # without fvcore) never need it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore.nn's import-time torch.jit.script
        from fvcore.nn import FlopCountAnalysis  # noqa: PLC0415

    analysis = FlopCountAnalysis(_LossOnly(model, target_mask, anchor_mask), views)
    # zero-cost handles (a ``None`` handle does not override fvcore's built-in matmul counter)
    analysis.set_op_handle(**{op: _no_macs for op in ATTENTION_PRODUCT_OPS})
    analysis.unsupported_ops_warnings(False)  # sdpa, GELU, softmax, loss: skipped by convention
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracer warnings
        return analysis.total() / 1e9


def gmacs_flopcounter(model: nn.Module, views: torch.Tensor, target_mask: float, anchor_mask: float) -> float:
    """FlopCounterMode matmul/conv FLOPs / 2 + 5·numel per LayerNorm input (GMACs); attention excluded."""
    if not model.training:
        raise ValueError("gmacs_flopcounter needs the model in train mode (MHA eval fast path is invisible)")
    layer_norm_macs = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: layer_norm_macs.append(5 * inp[0].numel()))
        for m in model.modules()
        if isinstance(m, nn.LayerNorm)
    ]
    try:
        with FlopCounterMode(display=False) as counter:
            model(views, target_mask, anchor_mask)
    finally:
        for h in hooks:
            h.remove()
    counted = {torch.ops.aten.addmm, torch.ops.aten.mm, torch.ops.aten.convolution}
    flops = sum(v for op, v in counter.get_flop_counts()["Global"].items() if op in counted)
    return (flops / 2 + sum(layer_norm_macs)) / 1e9


METHODS = {"fvcore": gmacs_fvcore, "flopcounter": gmacs_flopcounter}


def check_counter(counter: str) -> None:
    if counter not in METHODS:
        raise KeyError(f"unknown method {counter!r}; known: {', '.join(METHODS)}")


def gmacs_per_sample(
    model: nn.Module,
    n_views: int,
    img_size: int,
    target_mask: float,
    anchor_mask: float,
    counter: str = "fvcore",
    batch: int = 1,
) -> float:
    """GMACs per sample of one training forward of ``model`` (in train mode) on a random batch of
    ``batch`` samples of ``n_views`` views, counted by ``METHODS[counter]``."""
    check_counter(counter)
    views = torch.randn(batch, n_views, 3, img_size, img_size)
    return METHODS[counter](model, views, target_mask, anchor_mask) / batch


def run_counting_cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    count_rows: Callable[[argparse.Namespace], list[dict]],
    columns: list[str],
) -> None:
    """The counting commands' shared CLI: ``--threads`` and ``--log-file`` beside ``parser``'s own
    options (one of them ``--output``), then the rows ``count_rows(args)`` to the CSV ``--output``."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-file", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log_file)
    set_threads(args.threads)
    rows = count_rows(args)
    write_csv_atomic(pd.DataFrame(rows, columns=columns), args.output)
    LOG.info("wrote %d cells to %s", len(rows), args.output)


def table8_gflops(
    arch: str = "vit_small_patch16",
    img_size: int = 224,
    target_mask: float = 0.9,
    cells: list[tuple[int, float]] | None = None,
    method: str = "fvcore",
    seed: int = 0,
) -> list[dict]:
    """Rows {anchors, anchor_mask, gflops} for one training sample of every cell (forward only)."""
    check_counter(method)
    cells = cells if cells is not None else parse_cells(TABLE8_CELLS)
    torch.manual_seed(seed)  # weights and masks do not change the count; fixed for determinism
    model = CrossViewMAE(arch, img_size).train()  # train mode: the real training forward
    rows = []
    for n_anchors, anchor_mask in cells:
        gmacs = gmacs_per_sample(model, 1 + n_anchors, img_size, target_mask, anchor_mask, method)
        LOG.info("N=%d r_a=%.3f r_t=%.3f: %.4f GMACs (%s)", n_anchors, anchor_mask, target_mask, gmacs, method)
        rows.append({"anchors": n_anchors, "anchor_mask": anchor_mask, "gflops": round(gmacs, 6)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.pretrain flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="CSV with columns anchors,anchor_mask,gflops")
    parser.add_argument(
        "--arch", default="vit_small_patch16", help="registry name in pipeline.pretrain.models_mae.ARCHS"
    )
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--target-mask", type=float, default=0.9, help="r_t as a fraction")
    parser.add_argument("--cells", default=TABLE8_CELLS, help="comma-separated ANCHORS:ANCHOR_MASK (fractions)")
    parser.add_argument("--method", choices=sorted(METHODS), default="fvcore")
    run_counting_cli(
        parser,
        argv,
        lambda args: table8_gflops(args.arch, args.img_size, args.target_mask, parse_cells(args.cells), args.method),
        ["anchors", "anchor_mask", "gflops"],
    )
