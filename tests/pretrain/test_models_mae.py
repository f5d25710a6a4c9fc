"""CrossViewMAE / ViTEncoder: masking, loss, gradients, equivalences, parameter counts, loading."""

import argparse
import fractions
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import run
from pipeline.pretrain.checkpoints import load_encoder
from pipeline.pretrain.models_mae import (
    ARCHS,
    CrossViewDecoderBlock,
    CrossViewMAE,
    ViTEncoder,
    build_encoder,
    interpolate_pos_embed,
    parameter_counts,
    random_masking,
    resolve_arch,
    sincos_pos_embed_2d,
)
from pipeline.resume import UnsafeCheckpointError
from tests.support import TINY_MAE_ARCH


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return CrossViewMAE(TINY_MAE_ARCH, img_size=32, **kw)


def tiny_views(b=2, n=2, seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1 + n, 3, size, size, generator=g)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("ratio,keep", [(0.9, 19), (0.985, 2), (0.25, 147), (0.5, 98), (0.95, 9)])
def test_random_masking_counts(ratio, keep):
    x = torch.randn(3, 196, 4)
    x_masked, mask, ids_restore = random_masking(x, ratio)
    assert x_masked.shape == (3, keep, 4)
    assert mask.shape == (3, 196) and mask.dtype == torch.float32
    assert torch.all(mask.sum(1) == 196 - keep)
    # kept tokens are exactly those with mask 0, in some order
    for b in range(3):
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept[:, 0]).values, torch.sort(x_masked[b, :, 0]).values)
    # ids_restore inverts the shuffle
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(196).expand(3, -1))


def test_random_masking_rejects_ratio_keeping_nothing():
    with pytest.raises(ValueError, match="keeps 0 of 4"):
        random_masking(torch.randn(1, 4, 2), 0.9)


def test_masks_independent_per_sample_and_per_anchor():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.zeros(8, 196, 1), 0.9)
    assert len({tuple(m.tolist()) for m in mask}) == 8
    # the same image as two anchors of one sample: each anchor draws its own mask, so the kept
    # token sets (visible in the memory) differ
    model = tiny_model().eval()
    img = tiny_views(1, 1)[:, :1]
    anchors = img.expand(1, 2, 3, 32, 32)
    with torch.no_grad():
        memory = model.forward_anchors(anchors, 0.5)  # (1, 2 * (1 + 8), D)
    a0, a1 = memory[0, :9], memory[0, 9:]
    assert memory.shape == (1, 18, 32)
    assert not torch.allclose(a0[1:], a1[1:])


# ---------------------------------------------------------------- loss


def test_patchify_roundtrip_and_order():
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # patch 1 = row 0, column 1; (p, q, c) order: value [p=0, q=0, c=2] is index 2
    assert patches[0, 1, 2] == imgs[0, 2, 0, 8]
    assert patches[0, 4, 3 * 1 + 0] == imgs[0, 0, 8, 1]
    assert torch.equal(model.unpatchify(patches), imgs)


def test_loss_hand_computed_and_only_on_masked_patches():
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192)
    mask = torch.zeros(2, 16)
    mask[0, [1, 5]] = 1
    mask[1, [0]] = 1
    # hand: normalize each target patch by its mean / unbiased std, MSE per patch, mean of masked
    patches = model.patchify(imgs)
    expected = []
    for b, patch in [(0, 1), (0, 5), (1, 0)]:
        t = patches[b, patch]
        t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
        expected.append(((pred[b, patch] - t) ** 2).mean())
    loss = model.forward_loss(imgs, pred, mask)
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)
    # changing predictions of visible patches leaves the loss unchanged; masked ones change it
    pred2 = pred.clone()
    pred2[mask == 0] += 5.0
    assert torch.equal(model.forward_loss(imgs, pred2, mask), loss)
    pred3 = pred.clone()
    pred3[0, 5] += 1.0
    assert not torch.allclose(model.forward_loss(imgs, pred3, mask), loss)


def test_loss_without_norm_pix():
    model = tiny_model(norm_pix_loss=False)
    imgs = torch.randn(1, 3, 32, 32)
    mask = torch.ones(1, 16)
    assert torch.allclose(model.forward_loss(imgs, torch.zeros(1, 16, 192), mask), (imgs**2).mean())


# ---------------------------------------------------------------- forward / gradients


def test_forward_shapes_and_determinism():
    views = tiny_views(2, 3)
    out = []
    for _ in range(2):
        model = tiny_model(seed=3)
        torch.manual_seed(7)
        out.append(model(views, 0.75, 0.25))
    (loss, pred, mask), (loss2, pred2, mask2) = out
    assert pred.shape == (2, 16, 192) and mask.shape == (2, 16)
    assert torch.all(mask.sum(1) == 16 - int(16 * 0.25))
    assert torch.isfinite(loss)
    assert torch.equal(loss, loss2) and torch.equal(pred, pred2) and torch.equal(mask, mask2)


@pytest.mark.parametrize(
    "bad", [dict(target_mask=1.0), dict(anchor_mask=-0.1), dict(shape=(2, 1, 3, 32, 32)), dict(shape=(2, 3, 32, 32))]
)
def test_forward_rejects_bad_input(bad):
    model = tiny_model()
    views = torch.randn(*bad.get("shape", (2, 2, 3, 32, 32)))
    with pytest.raises(ValueError):
        model(views, bad.get("target_mask", 0.75), bad.get("anchor_mask", 0.0))


def test_gradients_reach_encoder_through_target_and_every_anchor():
    model = tiny_model().train()
    grads = []  # d loss / d patch-embed output, one entry per encoder call

    def hook(module, inp, out):
        out.register_hook(lambda g: grads.append(g))

    model.encoder.patch_embed.register_forward_hook(hook)
    loss, _, _ = model(tiny_views(2, 3), 0.75, 0.5)
    loss.backward()
    # two encoder calls: target (B, L, D) and all anchors batched (B * N, L, D); backward runs anchors first
    shapes = sorted(tuple(g.shape) for g in grads)
    assert shapes == [(2, 16, 32), (6, 16, 32)]
    anchor_grad = next(g for g in grads if g.shape[0] == 6).reshape(2, 3, 16, 32)
    target_grad = next(g for g in grads if g.shape[0] == 2)
    assert target_grad.abs().sum() > 0
    for j in range(3):
        assert anchor_grad[:, j].abs().sum() > 0, f"no gradient through anchor {j}"
    for name, p in model.encoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.encoder.pos_embed.grad is None and model.decoder_pos_embed.grad is None


def _reference_single_anchor(model, views, mask_ratio):
    """CropMAE SiameseMAE.forward written out from the model's parameters (spec §3-5)."""
    enc = model.encoder
    anchor, target = views[:, 1], views[:, 0]

    def embed(img):
        return enc.patch_embed.proj(img).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]

    def run_blocks(x):
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        for blk in enc.blocks:
            x = blk(x)
        return enc.norm(x)

    unmasked = run_blocks(embed(anchor))  # forward_encoder_no_masking
    x = embed(target)
    B, L, D = x.shape
    keep = int(L * (1 - mask_ratio))
    noise = torch.rand(B, L)
    ids_shuffle = torch.argsort(noise, 1)
    ids_restore = torch.argsort(ids_shuffle, 1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, D))
    mask = torch.ones(B, L)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    latent = run_blocks(x)

    mem = model.decoder_embed(unmasked)
    q = model.decoder_embed(latent)
    mask_tokens = model.mask_token.repeat(B, L + 1 - q.shape[1], 1)
    q_ = torch.cat([q[:, 1:], mask_tokens], 1)
    q_ = torch.gather(q_, 1, ids_restore[..., None].repeat(1, 1, q.shape[2]))
    q = torch.cat([q[:, :1], q_], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        q = blk.norm2(q + blk.multihead_attn(q, mem, mem, need_weights=False)[0])
        q = blk.norm3(q + blk.linear2(F.gelu(blk.linear1(q))))
        q = blk.norm1(q + blk.self_attn(q, q, q, need_weights=False)[0])
    pred = model.decoder_pred(model.decoder_norm(q))[:, 1:]
    target_p = model.patchify(target)
    mean, var = target_p.mean(-1, keepdim=True), target_p.var(-1, keepdim=True)
    target_p = (target_p - mean) / (var + 1e-6) ** 0.5
    loss = (((pred - target_p) ** 2).mean(-1) * mask).sum() / mask.sum()
    return loss, pred, mask


def test_single_unmasked_anchor_equals_reference_siamese_model():
    model = tiny_model().eval()  # dropout off
    views = tiny_views(3, 1)
    with torch.no_grad():
        torch.manual_seed(11)
        loss, pred, mask = model(views, 0.75, 0.0)
        torch.manual_seed(11)
        ref_loss, ref_pred, ref_mask = _reference_single_anchor(model, views, 0.75)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(pred, ref_pred, atol=1e-5)
    assert torch.allclose(loss, ref_loss, atol=1e-6)


def test_batched_anchor_encoding_equals_separate_calls():
    model = tiny_model().eval()
    anchors = tiny_views(2, 3)[:, 1:]  # (B=2, N=3, 3, 32, 32)
    B, N, L = 2, 3, 16
    with torch.no_grad():
        torch.manual_seed(5)
        memory = model.forward_anchors(anchors, 0.5)
        torch.manual_seed(5)
        noise = torch.rand(B * N, L).reshape(B, N, L)  # the batched call's noise, row b*N + j
        separate = [model.encoder.forward_masked(anchors[:, j], 0.5, noise[:, j])[0] for j in range(N)]
    expected = torch.cat(separate, dim=1)  # anchor after anchor, cls included: (B, N * (1 + 8), D)
    assert memory.shape == (B, N * 9, 32)
    assert torch.allclose(memory, expected, atol=1e-5)


def test_decoder_block_order_cross_mlp_self():
    torch.manual_seed(0)
    blk = CrossViewDecoderBlock(16, 2, 64).eval()
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        h = F.layer_norm(x + blk.multihead_attn(x, mem, mem)[0], (16,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        h = F.layer_norm(h + blk.linear2(F.gelu(blk.linear1(h))), (16,), blk.norm3.weight, blk.norm3.bias, 1e-6)
        h = F.layer_norm(h + blk.self_attn(h, h, h)[0], (16,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        assert torch.allclose(blk(x, mem), h, atol=1e-5)
    assert blk.dropout.p == blk.dropout1.p == blk.self_attn.dropout == 0.1


# ---------------------------------------------------------------- sizes, keys, init


def test_vit_small_patch16_parameter_counts():
    torch.manual_seed(0)
    model = CrossViewMAE("vit_small_patch16", 224)
    counts = parameter_counts(model)
    assert counts["encoder"] == 21_590_016  # 21.590 M
    assert counts["decoder"] == 6_611_712  # 6.612 M
    assert counts["decoder_blocks"] == 4 * 1_578_752  # 6.315 M (d_ff 2048; 4.214 M would mean d_ff 1024)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 21_590_016 + 6_611_712
    assert model.encoder.pos_embed.shape == (1, 197, 384) and not model.encoder.pos_embed.requires_grad
    assert model.decoder_pos_embed.shape == (1, 197, 256) and not model.decoder_pos_embed.requires_grad
    # init (spec §6): Linear xavier-uniform / zero bias, LayerNorm 1/0, tokens N(0, 0.02)
    fc1 = model.encoder.blocks[0].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (384 + 1536)) and model.encoder.blocks[0].mlp.fc1.bias.abs().sum() == 0
    assert 0.01 < model.encoder.cls_token.std() < 0.04 and 0.01 < model.mask_token.std() < 0.04
    assert model.encoder.blocks[0].norm1.eps == 1e-6 and model.decoder_blocks[0].norm1.eps == 1e-6


def test_encoder_state_dict_keys_are_mae_compatible():
    keys = list(build_encoder(TINY_MAE_ARCH, 32).state_dict())
    block0 = [k for k in keys if k.startswith("blocks.0.")]
    assert keys[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert block0 == [
        f"blocks.0.{n}"
        for n in (
            "norm1.weight",
            "norm1.bias",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.proj.weight",
            "attn.proj.bias",
            "norm2.weight",
            "norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
            "mlp.fc2.weight",
            "mlp.fc2.bias",
        )
    ]
    assert keys[-2:] == ["norm.weight", "norm.bias"]
    dec = [k for k in tiny_model().state_dict() if k.startswith("decoder_blocks.0.")]
    assert "decoder_blocks.0.multihead_attn.in_proj_weight" in dec and "decoder_blocks.0.linear1.weight" in dec
    assert "decoder_blocks.0.norm3.bias" in dec


def test_sincos_pos_embed_matches_mae_formula():
    emb = sincos_pos_embed_2d(8, 2, 3)  # D=8: channels 0-3 encode w, 4-7 encode h
    assert emb.shape == (1 + 6, 8) and torch.all(emb[0] == 0)
    tok = emb[1 + 1 * 3 + 2]  # h=1, w=2
    omega = [1.0, 0.01]  # 1 / 10000^(k / 2), k = 0, 1
    expected = [
        math.sin(2 * omega[0]),
        math.sin(2 * omega[1]),
        math.cos(2 * omega[0]),
        math.cos(2 * omega[1]),
        math.sin(1 * omega[0]),
        math.sin(1 * omega[1]),
        math.cos(1 * omega[0]),
        math.cos(1 * omega[1]),
    ]
    assert torch.allclose(tok, torch.tensor(expected), atol=1e-6)


def test_arch_registry_and_validation():
    assert set(ARCHS) >= {"vit_small_patch16", "vit_small_patch8", "vit_base_patch16", "vit_mini_patch8"}
    assert ARCHS["vit_small_patch16"]["decoder_ff"] == 2048
    with pytest.raises(KeyError, match="unknown arch 'vit_huge'"):
        resolve_arch("vit_huge")
    with pytest.raises(KeyError, match="unknown keys \\['mlp'\\]"):
        resolve_arch({**TINY_MAE_ARCH, "mlp": 4})


# ---------------------------------------------------------------- dense features


@pytest.mark.parametrize("patch,grid", [(16, (30, 55)), (8, (60, 110))])
def test_dense_features_non_square_grid(patch, grid):
    arch = {**TINY_MAE_ARCH, "patch_size": patch, "depth": 1}
    torch.manual_seed(0)
    enc = build_encoder(arch, 224).eval()
    with torch.no_grad():
        feats = enc.dense_features(torch.randn(1, 3, 480, 880))
    assert feats.shape == (1, 32, *grid)
    assert torch.isfinite(feats).all()


def test_dense_features_at_training_size_are_the_patch_tokens():
    torch.manual_seed(0)
    enc = build_encoder(TINY_MAE_ARCH, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = enc.dense_features(x)
        tokens = enc(x)[:, 1:]
    assert feats.shape == (2, 32, 4, 4)
    assert torch.equal(feats[:, :, 1, 2], tokens[:, 1 * 4 + 2])


def test_pos_embed_interpolation_keeps_cls_and_smooth_grid():
    table = sincos_pos_embed_2d(32, 14, 14)[None]
    assert interpolate_pos_embed(table, 14, 14) is table
    out = interpolate_pos_embed(table, 28, 14)
    assert out.shape == (1, 1 + 28 * 14, 32) and torch.equal(out[:, 0], table[:, 0])
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        build_encoder(TINY_MAE_ARCH, 32).dense_features(torch.randn(1, 3, 36, 32))


# ---------------------------------------------------------------- loading


def test_load_encoder_from_our_payload(tmp_path):
    model = tiny_model(seed=4)
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "arch": model.arch,
            "img_size": 32,
            "epoch": 1,
            "step": 10,
            "config": {"method": "cdgmae"},
        },
        path,
    )
    enc = load_encoder(path)
    assert isinstance(enc, ViTEncoder) and not enc.training
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k


def test_load_encoder_from_mae_format_and_encoder_only(tmp_path):
    model = tiny_model(seed=4)
    # MAE / CropMAE layout: encoder keys at top level next to decoder keys, under ckpt["model"]
    flat = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    torch.save({"model": flat, "epoch": 399}, tmp_path / "mae.pth")
    enc = load_encoder(tmp_path / "mae.pth", arch=TINY_MAE_ARCH)
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, model.encoder.blocks[1].mlp.fc2.weight)
    assert enc.img_size == 32  # inferred from pos_embed
    # a registered arch is inferred from the weights when not given
    torch.manual_seed(0)
    mini = build_encoder("vit_mini_patch8", 64)
    # DDP-wrapped names are accepted too
    torch.save({f"module.{k}": v for k, v in mini.state_dict().items()}, tmp_path / "encoder_only.pth")
    enc2 = load_encoder(tmp_path / "encoder_only.pth")
    assert enc2.img_size == 64 and len(enc2.blocks) == 4 and enc2.blocks[0].attn.num_heads == 4


def test_reference_checkpoint_with_pickled_args_loads(tmp_path):
    """MAE / CropMAE training checkpoints carry ``args`` (an argparse.Namespace): allowed by name."""
    model = tiny_model(seed=5)
    flat = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
    args = argparse.Namespace(model="mae_vit_small_patch16", lr=1.5e-4, output_dir="out")
    torch.save({"model": flat, "optimizer": {}, "epoch": 99, "scaler": {}, "args": args}, tmp_path / "ref.pth")
    enc = load_encoder(tmp_path / "ref.pth", arch=TINY_MAE_ARCH)
    assert torch.equal(enc.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


def test_load_encoder_fails_loudly(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    del state["encoder.blocks.1.mlp.fc2.weight"]
    torch.save({"model": state, "arch": model.arch, "img_size": 32}, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="blocks.1.mlp.fc2.weight"):
        load_encoder(tmp_path / "partial.pth")
    # an object outside the allow-list is refused under weights_only
    torch.save({"model": model.state_dict(), "extra": fractions.Fraction(1, 3)}, tmp_path / "pickled.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"refused: .*\(it references fractions.Fraction\)"):
        load_encoder(tmp_path / "pickled.pth", arch=TINY_MAE_ARCH)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_encoder(tmp_path / "nothing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pth"):
        load_encoder(tmp_path / "corrupt.pth")


def test_cli_describes_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    torch.save({"model": build_encoder("vit_mini_patch8", 64).state_dict()}, tmp_path / "mae.pth")
    run("pretrain", ["describe", "--checkpoint", str(tmp_path / "mae.pth")])
    out = capsys.readouterr().out
    assert '"img_size": 64' in out and '"depth": 4' in out and '"patch_size": 8' in out
