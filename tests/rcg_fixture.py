"""A tiny random-weight checkpoint pair in RCG's exact key layout, for the import test.

``write_rcg_fixture(folder)`` writes ``ldm.pth`` (what RCG's ``main_ldm.py`` saves: ``{"model":
LatentDiffusion.state_dict(), "model_ema": None, "optimizer", "epoch", "scaler", "args"}``),
``moco.pth.tar`` (what MoCo v3 saves: ``{"epoch", "arch", "state_dict": module.base_encoder.* /
module.momentum_encoder.* / module.predictor.*, "optimizer", "scaler"}``) and ``ldm.yaml`` (the
LDM config in RCG's ``config/ldm`` format). The architecture is RCG's LDM-8 (three UNet levels of
two res blocks, a spatial transformer at each, VQ-f8 with attention at its lowest level, a MoCo v3
ViT with its 3-layer projection MLP), only with tiny widths: UNet 32/64/128 channels, VQ 32..128,
a 2-block ViT of width 48 (12 heads, as MoCo's ViT-B), a 16-d representation.

The key names and shapes are written out here from the module definitions (RCG's openaimodel
UNetModel / SpatialTransformer, its taming-style Encoder / Decoder, timm's VisionTransformer, MoCo's
build_mlp, LitEma, the DDPM buffers); that they are exactly what RCG's own classes hold was checked
once by loading them with ``strict=True`` (see tests/sldm/test_rcg.py). Run as a script to write
the fixture to a folder: ``python tests/rcg_fixture.py DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

UNET = {"model_channels": 32, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "attention_resolutions": [4, 2, 1]}
UNET.update({"num_head_channels": 32, "context_dim": 16, "in_channels": 4, "image_size": 4})
VQ = {"ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [4], "resolution": 32}
VQ.update({"z_channels": 4, "in_channels": 3, "out_ch": 3, "embed_dim": 4, "n_embed": 64})
VIT = {"dim": 48, "depth": 2, "patch": 16, "tokens": 197, "mlp_hidden": 64, "rep_dim": 16}
SCHEDULE = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195}
N_CLASSES = 10


class Writer:
    """Random tensors of given shapes under given keys, from one seeded generator."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def randn(self, key: str, *shape: int, scale: float = 0.05) -> None:
        self.sd[key] = torch.randn(*shape, generator=self.gen) * scale

    def conv(self, key: str, c_out: int, c_in: int, k: int, bias: bool = True) -> None:
        self.randn(f"{key}.weight", c_out, c_in, k, k)
        if bias:
            self.randn(f"{key}.bias", c_out, scale=0.02)

    def linear(self, key: str, d_out: int, d_in: int, bias: bool = True) -> None:
        self.randn(f"{key}.weight", d_out, d_in, scale=1.0 / d_in**0.5)
        if bias:
            self.randn(f"{key}.bias", d_out, scale=0.02)

    def norm(self, key: str, c: int) -> None:  # GroupNorm / LayerNorm: weight and bias
        self.sd[f"{key}.weight"] = 1.0 + torch.randn(c, generator=self.gen) * 0.1
        self.randn(f"{key}.bias", c, scale=0.05)

    def batchnorm(self, key: str, c: int, affine: bool = True) -> None:
        if affine:
            self.norm(key, c)
        self.randn(f"{key}.running_mean", c, scale=0.1)
        self.sd[f"{key}.running_var"] = torch.rand(c, generator=self.gen) + 0.5
        self.sd[f"{key}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.long)


def unet_resblock(w: Writer, key: str, c_in: int, c_out: int, emb: int) -> None:
    """openaimodel ResBlock (no scale-shift norm): in_layers, emb_layers, out_layers, skip."""
    w.norm(f"{key}.in_layers.0", c_in)
    w.conv(f"{key}.in_layers.2", c_out, c_in, 3)
    w.linear(f"{key}.emb_layers.1", c_out, emb)
    w.norm(f"{key}.out_layers.0", c_out)
    w.conv(f"{key}.out_layers.3", c_out, c_out, 3)
    if c_in != c_out:
        w.conv(f"{key}.skip_connection", c_out, c_in, 1)


def spatial_transformer(w: Writer, key: str, ch: int, context: int) -> None:
    """SpatialTransformer of depth 1: GroupNorm, 1x1 proj_in / proj_out, one BasicTransformerBlock."""
    w.norm(f"{key}.norm", ch)
    w.conv(f"{key}.proj_in", ch, ch, 1)
    b = f"{key}.transformer_blocks.0"
    for attn, kv in (("attn1", ch), ("attn2", context)):
        w.linear(f"{b}.{attn}.to_q", ch, ch, bias=False)
        w.linear(f"{b}.{attn}.to_k", ch, kv, bias=False)
        w.linear(f"{b}.{attn}.to_v", ch, kv, bias=False)
        w.linear(f"{b}.{attn}.to_out.0", ch, ch)
    w.linear(f"{b}.ff.net.0.proj", ch * 8, ch)  # GEGLU: value and gate
    w.linear(f"{b}.ff.net.2", ch, ch * 4)
    for n in (1, 2, 3):
        w.norm(f"{b}.norm{n}", ch)
    w.conv(f"{key}.proj_out", ch, ch, 1)


def unet_state(w: Writer, p: str) -> None:
    """openaimodel UNetModel (spatial transformers, conv resampling) under prefix ``p``."""
    mc, u = UNET["model_channels"], UNET
    emb = 4 * mc
    w.linear(f"{p}time_embed.0", emb, mc)
    w.linear(f"{p}time_embed.2", emb, emb)
    w.conv(f"{p}input_blocks.0.0", mc, u["in_channels"], 3)
    ch, ds, k, skips = mc, 1, 1, [mc]
    for level, mult in enumerate(u["channel_mult"]):
        for _ in range(u["num_res_blocks"]):
            unet_resblock(w, f"{p}input_blocks.{k}.0", ch, mult * mc, emb)
            ch = mult * mc
            if ds in u["attention_resolutions"]:
                spatial_transformer(w, f"{p}input_blocks.{k}.1", ch, u["context_dim"])
            k, skips = k + 1, skips + [ch]
        if level != len(u["channel_mult"]) - 1:
            w.conv(f"{p}input_blocks.{k}.0.op", ch, ch, 3)
            k, ds, skips = k + 1, ds * 2, skips + [ch]
    unet_resblock(w, f"{p}middle_block.0", ch, ch, emb)
    spatial_transformer(w, f"{p}middle_block.1", ch, u["context_dim"])
    unet_resblock(w, f"{p}middle_block.2", ch, ch, emb)
    k = 0
    for level, mult in reversed(list(enumerate(u["channel_mult"]))):
        for i in range(u["num_res_blocks"] + 1):
            unet_resblock(w, f"{p}output_blocks.{k}.0", ch + skips.pop(), mult * mc, emb)
            ch, idx = mult * mc, 1
            if ds in u["attention_resolutions"]:
                spatial_transformer(w, f"{p}output_blocks.{k}.1", ch, u["context_dim"])
                idx = 2
            if level and i == u["num_res_blocks"]:
                w.conv(f"{p}output_blocks.{k}.{idx}.conv", ch, ch, 3)
                ds //= 2
            k += 1
    w.norm(f"{p}out.0", ch)
    w.conv(f"{p}out.2", u["in_channels"], mc, 3)


def vq_resblock(w: Writer, key: str, c_in: int, c_out: int) -> None:
    w.norm(f"{key}.norm1", c_in)
    w.conv(f"{key}.conv1", c_out, c_in, 3)
    w.norm(f"{key}.norm2", c_out)
    w.conv(f"{key}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        w.conv(f"{key}.nin_shortcut", c_out, c_in, 1)


def vq_attention(w: Writer, key: str, c: int) -> None:
    w.norm(f"{key}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        w.conv(f"{key}.{name}", c, c, 1)


def vq_state(w: Writer, p: str) -> None:
    """The LDM VQModel (taming Encoder / Decoder, no temb, VectorQuantizer) under prefix ``p``."""
    v, ch, levels = VQ, VQ["ch"], len(VQ["ch_mult"])
    w.conv(f"{p}encoder.conv_in", ch, v["in_channels"], 3)
    res, block_in = v["resolution"], ch
    for i, mult in enumerate(v["ch_mult"]):
        for j in range(v["num_res_blocks"]):
            vq_resblock(w, f"{p}encoder.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
            if res in v["attn_resolutions"]:
                vq_attention(w, f"{p}encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            w.conv(f"{p}encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    for side in ("encoder", "decoder"):
        vq_resblock(w, f"{p}{side}.mid.block_1", block_in, block_in)
        vq_attention(w, f"{p}{side}.mid.attn_1", block_in)
        vq_resblock(w, f"{p}{side}.mid.block_2", block_in, block_in)
    w.norm(f"{p}encoder.norm_out", block_in)
    w.conv(f"{p}encoder.conv_out", v["z_channels"], block_in, 3)
    w.conv(f"{p}decoder.conv_in", block_in, v["z_channels"], 3)
    for i in reversed(range(levels)):
        for j in range(v["num_res_blocks"] + 1):
            vq_resblock(w, f"{p}decoder.up.{i}.block.{j}", block_in, ch * v["ch_mult"][i])
            block_in = ch * v["ch_mult"][i]
            if res in v["attn_resolutions"]:
                vq_attention(w, f"{p}decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            w.conv(f"{p}decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    w.norm(f"{p}decoder.norm_out", block_in)
    w.conv(f"{p}decoder.conv_out", v["out_ch"], block_in, 3)
    w.randn(f"{p}quantize.embedding.weight", v["n_embed"], v["embed_dim"], scale=1.0)
    w.conv(f"{p}quant_conv", v["embed_dim"], v["z_channels"], 1)
    w.conv(f"{p}post_quant_conv", v["z_channels"], v["embed_dim"], 1)


def mlp_state(w: Writer, p: str, dims: list[int], last_bn: bool) -> None:
    """MoCo v3's build_mlp: Linear (no bias) [-> BatchNorm1d -> ReLU], last BN without affine."""
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        w.linear(f"{p}{3 * i}", d_out, d_in, bias=False)
        last = i == len(dims) - 2
        if not last or last_bn:
            w.batchnorm(f"{p}{3 * i + 1}", d_out, affine=not last)


def vit_state(w: Writer, p: str) -> None:
    """MoCo v3 VisionTransformerMoCo (timm ViT, class token) with the projection MLP as ``head``."""
    d = VIT["dim"]
    w.randn(f"{p}cls_token", 1, 1, d, scale=1e-3)
    w.randn(f"{p}pos_embed", 1, VIT["tokens"], d, scale=0.5)
    w.conv(f"{p}patch_embed.proj", d, 3, VIT["patch"])
    for b in range(VIT["depth"]):
        w.norm(f"{p}blocks.{b}.norm1", d)
        w.linear(f"{p}blocks.{b}.attn.qkv", 3 * d, d)
        w.linear(f"{p}blocks.{b}.attn.proj", d, d)
        w.norm(f"{p}blocks.{b}.norm2", d)
        w.linear(f"{p}blocks.{b}.mlp.fc1", 4 * d, d)
        w.linear(f"{p}blocks.{b}.mlp.fc2", d, 4 * d)
    w.norm(f"{p}norm", d)
    mlp_state(w, f"{p}head.", [d, VIT["mlp_hidden"], VIT["mlp_hidden"], VIT["rep_dim"]], last_bn=True)


def schedule_buffers() -> dict[str, torch.Tensor]:
    """LatentDiffusion's registered DDPM buffers for LDM's "linear" (sqrt-spaced) betas."""
    s = SCHEDULE
    betas = np.linspace(s["linear_start"] ** 0.5, s["linear_end"] ** 0.5, s["timesteps"], dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def ldm_config() -> dict:
    """The tiny LDM config in RCG's config/ldm format (the keys the import reads)."""
    unet = {**UNET, "out_channels": UNET["in_channels"], "use_spatial_transformer": True, "transformer_depth": 1}
    dd = {k: VQ[k] for k in ("z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult")}
    dd.update({"double_z": False, "num_res_blocks": VQ["num_res_blocks"], "attn_resolutions": VQ["attn_resolutions"]})
    return {
        "model": {
            "target": "pixel_generator.ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                **SCHEDULE,
                "conditioning_key": "crossattn",
                "cond_stage_trainable": True,
                "unet_config": {
                    "target": "pixel_generator.ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": unet,
                },
                "first_stage_config": {
                    "target": "pixel_generator.ldm.models.autoencoder.VQModelInterface",
                    "params": {"embed_dim": VQ["embed_dim"], "n_embed": VQ["n_embed"], "ddconfig": dd},
                },
                "cond_stage_config": {
                    "target": "pixel_generator.ldm.modules.encoders.modules.ClassEmbedder",
                    "params": {"embed_dim": UNET["context_dim"], "n_classes": N_CLASSES},
                },
                "pretrained_enc_config": {
                    "params": {"pretrained_enc_arch": "mocov3_vit_base", "pretrained_enc_withproj": True}
                },
            },
        }
    }


def write_rcg_fixture(folder, seed: int = 0) -> dict[str, Path]:
    """Write ``ldm.pth``, ``moco.pth.tar`` and ``ldm.yaml`` into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    enc = Writer(seed + 1)
    vit_state(enc, "")
    moco = {f"module.base_encoder.{k}": v for k, v in enc.sd.items()}
    momentum = Writer(seed + 2)
    vit_state(momentum, "module.momentum_encoder.")
    mlp_state(momentum, "module.predictor.", [VIT["rep_dim"], VIT["mlp_hidden"], VIT["rep_dim"]], last_bn=False)
    moco.update(momentum.sd)
    w = Writer(seed)
    unet_state(w, "model.diffusion_model.")
    ema = Writer(seed + 3)
    unet_state(ema, "")
    w.sd["model_ema.decay"] = torch.tensor(0.9999)
    w.sd["model_ema.num_updates"] = torch.tensor(12345, dtype=torch.int32)
    w.sd.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema.sd.items()})
    w.sd.update(schedule_buffers())
    w.sd.update({f"pretrained_encoder.{k}": v.clone() for k, v in enc.sd.items()})
    vq_state(w, "first_stage_model.")
    w.randn("cond_stage_model.embedding.weight", N_CLASSES, UNET["context_dim"], scale=1.0)
    paths = {"ldm": folder / "ldm.pth", "encoder": folder / "moco.pth.tar", "config": folder / "ldm.yaml"}
    training = {
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0, 1]}]},
        "scaler": {"scale": 65536.0},
    }
    args = argparse.Namespace(batch_size=4, epochs=40, blr=2.5e-7, config=str(paths["config"]))
    torch.save({"model": w.sd, "model_ema": None, "epoch": 39, "args": args, **training}, paths["ldm"])
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": moco, **training}, paths["encoder"])
    paths["config"].write_text(yaml.safe_dump(ldm_config(), sort_keys=False))
    return paths


if __name__ == "__main__":
    print(write_rcg_fixture(sys.argv[1]))
