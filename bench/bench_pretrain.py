"""Benchmark one CDG-MAE training step against a plain reference-style implementation of the same step.

Both run in this process on the same weights and random views: forward, backward, AdamW step.

* ours: ``pipeline.pretrain.models_mae.CrossViewMAE`` — all N anchors through the encoder in one batched
  call, fused attention (``scaled_dot_product_attention`` in the encoder, ``nn.MultiheadAttention``
  with ``need_weights=False`` in the decoder);
* reference-style: the CropMAE/SiamMAE recipe generalized to N anchors the obvious way — one encoder
  call per anchor, attention written out as softmax(QK^T / sqrt(d)) V in every encoder and decoder
  block. Same parameters, same masks.

Before timing, the two losses are compared in eval mode with identical masks (must agree to ~1e-5).
The table prints training samples/s (batch / median step time; the two implementations' steps are
interleaved so that load changes on a shared machine hit both alike), peak memory of one step (``bench.common.measure``:
CUDA max allocated on GPU, on CPU the resident-set growth) and the ratios ours / reference.

    python -m bench.bench_pretrain [--arch vit_small_patch16 --img-size 224 --batch 64 --steps 10 \
        --cells "1:0,2:0.5,3:0.25" --threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from bench.common import interleaved_seconds, measure, print_table_header, print_table_row
from pipeline.devices import set_threads
from pipeline.pretrain.flops import parse_cells
from pipeline.pretrain.models_mae import CrossViewMAE, random_masking

# ------------------------------------------------------------------ reference-style step


def explicit_attention(q, k, v):
    """(B, h, Lq, d), (B, h, Lk, d) -> (B, h, Lq, d) with the attention matrix materialized."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return attn.softmax(dim=-1) @ v


def ref_encoder_block(blk, x):
    """timm Block with its attention written out (pre-norm, qkv fused linear)."""
    B, T, D = x.shape
    h = blk.attn.num_heads
    y = blk.norm1(x)
    qkv = blk.attn.qkv(y).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
    y = explicit_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, T, D)
    x = x + blk.attn.proj(y)
    return x + blk.mlp(blk.norm2(x))


def ref_encode(model, img, ratio, noise):
    enc = model.encoder
    x = enc.patch_embed(img) + enc.pos_embed[:, 1:]
    if ratio > 0:
        x, mask, ids_restore = random_masking(x, ratio, noise)
    else:
        mask = ids_restore = None
    cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in enc.blocks:
        x = ref_encoder_block(blk, x)
    return enc.norm(x), mask, ids_restore


def ref_mha(mha, q_in, kv_in, training):
    """nn.MultiheadAttention written out: packed in-projection, explicit attention, out-projection."""
    B, Lq, C = q_in.shape
    h = mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

    def heads(t):
        return t.reshape(B, -1, h, C // h).transpose(1, 2)

    q, k, v = heads(F.linear(q_in, w_q, b_q)), heads(F.linear(kv_in, w_k, b_k)), heads(F.linear(kv_in, w_v, b_v))
    attn = ((q @ k.transpose(-2, -1)) * (C // h) ** -0.5).softmax(dim=-1)
    attn = F.dropout(attn, mha.dropout, training)
    out = (attn @ v).transpose(1, 2).reshape(B, Lq, C)
    return mha.out_proj(out)


def ref_forward(model, views, target_mask, anchor_mask, target_noise, anchor_noise):
    """Target + one encoder call per anchor; decoder with explicit attention. Returns the loss."""
    B, n_views = views.shape[:2]
    N = n_views - 1
    training = model.training
    latent, mask, ids_restore = ref_encode(model, views[:, 0], target_mask, target_noise)
    anchor_noise = anchor_noise.reshape(B, N, -1) if anchor_noise is not None else None
    memory = torch.cat(
        [
            ref_encode(model, views[:, 1 + j], anchor_mask, anchor_noise[:, j] if anchor_noise is not None else None)[0]
            for j in range(N)
        ],
        dim=1,
    )
    x, memory = model.decoder_embed(latent), model.decoder_embed(memory)
    L, C = ids_restore.shape[1], x.shape[-1]
    x_ = torch.cat([x[:, 1:], model.mask_token.repeat(B, L + 1 - x.shape[1], 1)], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, C))
    x = torch.cat([x[:, :1], x_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk.norm2(x + blk.dropout2(ref_mha(blk.multihead_attn, x, memory, training)))
        x = blk.norm3(x + blk.dropout3(blk.linear2(blk.dropout(blk.activation(blk.linear1(x))))))
        x = blk.norm1(x + blk.dropout1(ref_mha(blk.self_attn, x, x, training)))
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    return model.forward_loss(views[:, 0], pred, mask)


# ------------------------------------------------------------------ measurement


def peak_memory(step, device):
    """Peak memory (MiB) of one step (``bench.common.measure``)."""
    with measure(device) as m:
        step()
    return m.peak_mib


def check_equivalence(model, views, target_mask, anchor_mask):
    """Same weights, same masks, eval mode: our forward and the reference-style one agree."""
    B, n_views = views.shape[:2]
    L = model.encoder.grid_size**2
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        ours = model(views, target_mask, anchor_mask)[0]
        torch.manual_seed(0)
        target_noise = torch.rand(B, L, device=views.device)
        anchor_noise = torch.rand(B * (n_views - 1), L, device=views.device) if anchor_mask > 0 else None
        ref = ref_forward(model, views, target_mask, anchor_mask, target_noise, anchor_noise)
    model.train()
    return abs(ours.item() - ref.item())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small_patch16")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 64 on GPU, 4 on CPU)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per implementation (default 10 on GPU, 3 on CPU)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--target-mask", type=float, default=0.9)
    parser.add_argument("--cells", default="1:0,2:0.5,3:0.25", help="ANCHORS:ANCHOR_MASK list")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto = bf16 autocast on CUDA, fp32 on CPU",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 4)
    steps = args.steps or (10 if device.type == "cuda" else 3)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")

    torch.manual_seed(0)
    model = CrossViewMAE(args.arch, args.img_size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    L = model.encoder.grid_size**2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# {args.arch} {args.img_size}px, r_t={args.target_mask}, batch {batch}, {steps} timed steps "
        f"(+{args.warmup} warm-up), {'bf16 autocast' if bf16 else 'fp32'}, {where}, torch {torch.__version__}"
    )
    header = ("N", "r_a", "impl", "samples/s", "peak MiB", "speed ratio", "memory ratio", "|dloss|")
    print_table_header(list(header))

    for n_anchors, anchor_mask in parse_cells(args.cells):
        views = torch.randn(batch, 1 + n_anchors, 3, args.img_size, args.img_size, device=device)
        dloss = check_equivalence(model, views[:2], args.target_mask, anchor_mask)

        def make_step(forward):
            def train_step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = forward()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            return train_step

        # the cell's values bound now (each closure is only used within its own iteration)
        def ours(views=views, anchor_mask=anchor_mask):
            return model(views, args.target_mask, anchor_mask)[0]

        def reference(views=views, anchor_mask=anchor_mask, n_anchors=n_anchors):
            target_noise = torch.rand(batch, L, device=device)
            anchor_noise = torch.rand(batch * n_anchors, L, device=device) if anchor_mask > 0 else None
            return ref_forward(model, views, args.target_mask, anchor_mask, target_noise, anchor_noise)

        steps_by_name = {"reference": make_step(reference), "ours": make_step(ours)}
        for step in steps_by_name.values():
            for _ in range(args.warmup):
                step()
        memory = {name: peak_memory(step, device) for name, step in steps_by_name.items()}
        seconds = {k: statistics.median(v) for k, v in interleaved_seconds(steps_by_name, steps, device=device).items()}
        r_sps, o_sps = batch / seconds["reference"], batch / seconds["ours"]
        r_mem, o_mem = memory["reference"], memory["ours"]
        print_table_row(
            [n_anchors, f"{anchor_mask:g}", "reference", f"{r_sps:.2f}", f"{r_mem:.0f}", "1.00", "1.00", ""]
        )
        print_table_row(
            [n_anchors, f"{anchor_mask:g}", "ours", f"{o_sps:.2f}", f"{o_mem:.0f}", f"{o_sps / r_sps:.2f}"]
            + [f"{o_mem / max(r_mem, 1e-9):.2f}", f"{dloss:.1e}"]
        )


if __name__ == "__main__":
    main()
