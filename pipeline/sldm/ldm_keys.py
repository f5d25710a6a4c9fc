"""CompVis latent-diffusion layouts -> diffusers: key maps and the equivalent diffusers models.

``unet_key``: an openaimodel ``UNetModel`` key (spatial transformers, conv resampling, no
scale-shift norm) -> the ``UNet2DConditionModel`` key; ``vq_key``: a taming-style first-stage
``VQModel`` key -> the diffusers ``VQModel`` key. Both raise ``KeyError`` on a key they do not
know, so an import can name it. ``build_unet`` / ``build_vq`` make the diffusers models of an LDM
config (``model.params``), level by level the same blocks, attention where the config puts it.
Written from the layouts of RCG's LDM code (github.com/LTH14/rcg), which are CompVis's.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel, VQModel

UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VQ_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_key(key: str, layers: int) -> str:
    """An openaimodel ``UNetModel`` key -> the ``UNet2DConditionModel`` key (KeyError if unknown)."""
    p = key.split(".")
    if p[0] in ("time_embed", "out"):
        names = {"time_embed": {"0": "time_embedding.linear_1", "2": "time_embedding.linear_2"}}
        names["out"] = {"0": "conv_norm_out", "2": "conv_out"}
        return ".".join([names[p[0]][p[1]], *p[2:]])
    i, sub, rest = int(p[1]), p[2], p[3:]
    if p[0] == "middle_block":
        block = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[i]
        return f"{block}.{_unet_resnet(p[2:]) if i != 1 else '.'.join(p[2:])}"
    if p[0] == "input_blocks":
        if i == 0:
            return ".".join(["conv_in", *rest]) if sub == "0" else _unknown(key)
        level, j = divmod(i - 1, layers + 1)
        if j == layers:  # the level's Downsample (its "op" conv)
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[1]}" if rest[0] == "op" else _unknown(key)
        kind = {"0": "resnets", "1": "attentions"}[sub]
        return f"down_blocks.{level}.{kind}.{j}.{_unet_resnet(rest) if sub == '0' else '.'.join(rest)}"
    if p[0] == "output_blocks":
        level, j = divmod(i, layers + 1)
        if sub == "0":
            return f"up_blocks.{level}.resnets.{j}.{_unet_resnet(rest)}"
        if rest[0] == "conv":  # an Upsample: after the attention (index 2) or instead of it (index 1)
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[1]}"
        return f"up_blocks.{level}.attentions.{j}.{'.'.join(rest)}" if sub == "1" else _unknown(key)
    return _unknown(key)


def _unet_resnet(rest: list[str]) -> str:
    name = ".".join(rest[:-1])
    return f"{UNET_RESNET[name] if name in UNET_RESNET else _unknown(name)}.{rest[-1]}"


def _unknown(key: str):
    raise KeyError(key)


def vq_key(key: str, levels: int) -> str:
    """A LDM/taming ``VQModel`` key -> the diffusers ``VQModel`` key (KeyError if unknown)."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or key == "quantize.embedding.weight":
        return key
    if p[0] not in ("encoder", "decoder"):
        return _unknown(key)
    side, name, rest = p[0], p[1], p[2:]
    if name in ("conv_in", "conv_out"):
        return key
    if name == "norm_out":
        return ".".join([side, "conv_norm_out", *rest])
    if name == "mid":
        block = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[rest[0]]
        return f"{side}.mid_block.{block}.{_vq_layer(block, rest[1:])}"
    level = int(rest[0]) if side == "encoder" else levels - 1 - int(rest[0])
    prefix = f"{side}.{'down' if side == 'encoder' else 'up'}_blocks.{level}"
    if rest[1] in ("downsample", "upsample"):
        return f"{prefix}.{rest[1][:-6]}samplers.0.conv.{rest[-1]}"
    kind = {"block": "resnets", "attn": "attentions"}[rest[1]]
    return f"{prefix}.{kind}.{rest[2]}.{_vq_layer(kind, rest[3:])}"


def _vq_layer(kind: str, rest: list[str]) -> str:
    if kind.startswith("attentions"):
        return f"{VQ_ATTENTION[rest[0]]}.{rest[1]}"
    return ".".join(["conv_shortcut" if rest[0] == "nin_shortcut" else rest[0], *rest[1:]])


def build_unet(params: dict) -> UNet2DConditionModel:
    """The diffusers UNet of an openaimodel ``UNetModel`` config (``unet_config.params``)."""
    u = params["unet_config"]["params"]
    channels = [u["model_channels"] * m for m in u["channel_mult"]]
    attention = [2**level in u["attention_resolutions"] for level in range(len(channels))]
    heads = u.get("num_heads", -1)
    heads = (
        [c // u["num_head_channels"] for c in channels]
        if u.get("num_head_channels", -1) != -1
        else [heads] * len(channels)
    )
    return UNet2DConditionModel(
        sample_size=u["image_size"],
        in_channels=u["in_channels"],
        out_channels=u["out_channels"],
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=u["num_res_blocks"],
        attention_head_dim=heads,  # diffusers' name for the number of heads per level
        cross_attention_dim=u["context_dim"],
        transformer_layers_per_block=u.get("transformer_depth", 1),
        norm_num_groups=32,
        flip_sin_to_cos=True,  # openaimodel's timestep embedding is [cos, sin]
        freq_shift=0,
    )


def build_vq(params: dict, scale_factor: float) -> VQModel:
    """The diffusers VQModel of a ``VQModelInterface`` config (attention where ``attn_resolutions``)."""
    fs = params["first_stage_config"]["params"]
    dd = fs["ddconfig"]
    attention = [dd["resolution"] // 2**level in dd["attn_resolutions"] for level in range(len(dd["ch_mult"]))]
    return VQModel(
        in_channels=dd["in_channels"],
        out_channels=dd["out_ch"],
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)],
        block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]],
        layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"],
        sample_size=dd["resolution"],
        num_vq_embeddings=fs["n_embed"],
        vq_embed_dim=fs["embed_dim"],
        norm_num_groups=32,
        scaling_factor=scale_factor,  # LatentDiffusion divides latents by its scale_factor to decode
    )
