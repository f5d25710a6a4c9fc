"""Cross-view masked autoencoder (CDG-MAE) and the ViT encoder it trains (model only; checkpoint
files are ``pipeline.pretrain.checkpoints``).

The model generalizes CropMAE's ``SiameseMAE`` (itself MAE's ``MaskedAutoencoderViT`` with a
cross-attention decoder) from one unmasked anchor to N anchors, each masked independently:

* encoder: timm ``PatchEmbed`` + pre-norm ``Block`` s, fixed 2-D sin-cos position embedding with a zero
  cls row, final LayerNorm (eps 1e-6). State-dict keys ``cls_token, pos_embed, patch_embed.proj.*,
  blocks.*, norm.*`` are MAE/CropMAE's, so encoder weights move between the code bases;
* target (view 0) masked at r_t, anchors (views 1..N) masked at r_a, all anchors through the shared
  encoder in **one** batched call;
* decoder: post-norm blocks cross-attention -> MLP -> self-attention (CropMAE's ``DecoderBlock``),
  queries = target tokens + mask tokens with decoder pos-embed, memory = all anchors' tokens
  (cls included) concatenated, no decoder pos-embed on the memory;
* loss: normalized-pixel MSE on the masked target patches only.

Attention goes through ``F.scaled_dot_product_attention`` (timm's fused attention) and
``nn.MultiheadAttention(need_weights=False)``, so FLOP counters skip the QK^T / AV products exactly as
the paper's Table 8 convention does (see ``pipeline.pretrain.flops``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from pipeline.registry import Registry

ARCH_KEYS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "decoder_ff",
)

# name -> architecture. Decoders follow CropMAE's factories (siam_mae_vit_small / _base); the
# feed-forward width is DecoderBlock's constructor default 2048, never overridden there.
ARCHS = Registry("arch")
# ViT-S encoder with CropMAE's siam_mae_vit_small decoder; the /16 and /8 archs differ only in patch
_VIT_SMALL = dict(
    embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, decoder_ff=2048
)
# CPU demo: a few hundred steps at 64 px train in well under a minute on one core.
_VIT_MINI = dict(
    embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, decoder_ff=512
)
ARCHS.add("vit_small_patch16", dict(patch_size=16, **_VIT_SMALL))
ARCHS.add("vit_small_patch8", dict(patch_size=8, **_VIT_SMALL))
ARCHS.add(
    "vit_base_patch16",
    dict(
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        decoder_ff=2048,
    ),
)
ARCHS.add("vit_mini_patch8", dict(patch_size=8, **_VIT_MINI))
# its smaller-patch sibling, for the demo's Figure 4 (patch size comparison at 64 px)
ARCHS.add("vit_mini_patch4", dict(patch_size=4, **_VIT_MINI))


def resolve_arch(arch: str | Mapping) -> dict[str, int]:
    """Registry name or explicit dict -> a validated architecture dict (a fresh copy)."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise KeyError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
        return dict(ARCHS[arch])
    arch = dict(arch)
    arch.pop("name", None)
    missing = [k for k in ARCH_KEYS if k not in arch]
    unknown = [k for k in arch if k not in ARCH_KEYS]
    if missing or unknown:
        raise KeyError(f"arch dict: missing keys {missing}, unknown keys {unknown}; expected exactly {list(ARCH_KEYS)}")
    for key in ARCH_KEYS:
        if int(arch[key]) != arch[key] or arch[key] <= 0:
            raise ValueError(f"arch dict: {key}={arch[key]!r} must be a positive integer")
        arch[key] = int(arch[key])
    if arch["embed_dim"] % arch["num_heads"] or arch["decoder_embed_dim"] % arch["decoder_num_heads"]:
        raise ValueError(f"arch dict: embedding widths must divide by the head counts: {arch}")
    return arch


def arch_name(arch: Mapping) -> str | None:
    """The registry name of an architecture dict, or None if it is not registered."""
    arch = {k: arch[k] for k in ARCH_KEYS if k in arch}
    for name, spec in ARCHS.items():
        if spec == arch:
            return name
    return None


# --------------------------------------------------------------------------------------------
# position embeddings


def sincos_pos_embed_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (D/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table: (1 [+1 zero cls row] + grid_h*grid_w, embed_dim), row-major.

    As in MAE, the first half of the channels encodes the w coordinate, the second half h.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    hh, ww = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )  # (gh, gw)
    emb = torch.cat([sincos_pos_embed_1d(embed_dim // 2, ww), sincos_pos_embed_1d(embed_dim // 2, hh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINO-style bicubic resize of a (1, 1 + g*g, D) table to a (grid_h, grid_w) grid.

    The +0.1 on the scale factors avoids floating-point error in the output size (DINO); the cls row
    is kept as is. Returns (1, 1 + grid_h*grid_w, D).
    """
    n_patches = pos_embed.shape[1] - 1
    side = int(math.isqrt(n_patches))
    if side * side != n_patches:
        raise ValueError(f"pos_embed has {n_patches} patch rows, not a square grid")
    if (grid_h, grid_w) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
        mode="bicubic",
        align_corners=False,
    )
    if patch_pos.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"pos-embed interpolation gave {tuple(patch_pos.shape[-2:])}, expected {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# --------------------------------------------------------------------------------------------
# masking


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of uniform noise (MAE).

    x: (B, L, D) -> x_masked (B, len_keep, D), mask (B, L) with 1 = removed, ids_restore (B, L).
    len_keep = int(L * (1 - mask_ratio)) truncates like the reference: 19 of 196 at 0.9, 2 at 0.985.
    """
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if not 1 <= len_keep <= L:
        raise ValueError(f"mask ratio {mask_ratio} keeps {len_keep} of {L} tokens; need at least 1")
    if noise is None:
        noise = torch.rand(B, L, device=x.device)  # (B, L) in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, len_keep)
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)  # float32 even under autocast: exact counts in the loss
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # back to patch order
    return x_masked, mask, ids_restore


# --------------------------------------------------------------------------------------------
# encoder


def _init_linear_and_norm(module: nn.Module) -> None:
    """MAE's ``_init_weights``: xavier-uniform Linear with zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """MAE-style ViT encoder with a fixed sin-cos position embedding (keys MAE/CropMAE compatible)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # strict_img_size=False: dense_features runs on any multiple of the patch size
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim, strict_img_size=False)
        self.grid_size = img_size // patch_size
        num_patches = self.grid_size**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid_size, self.grid_size)[None])
        w = self.patch_embed.proj.weight.data  # xavier on the flattened (D, 3*p*p) view, like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv bias keeps torch's default, as in MAE
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # -- pieces ---------------------------------------------------------------------------
    def patch_grid(self, x: torch.Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        return H // p, W // p

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, D) patch tokens + position embedding (no cls)."""
        gh, gw = self.patch_grid(x)
        pos = interpolate_pos_embed(self.pos_embed, gh, gw)
        return self.patch_embed(x) + pos[:, 1:]

    def _cls_and_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, D) visible tokens -> (B, 1 + K, D) after cls prepend, blocks and final norm."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # -- entry points ---------------------------------------------------------------------
    def forward_masked(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """(B, 3, H, W) -> latent (B, 1 + len_keep, D), mask (B, L), ids_restore (B, L).

        mask_ratio 0 keeps every token in patch order and draws no noise (the reference's
        ``forward_encoder_no_masking``), so the RNG stream matches the single-anchor model.
        ``noise`` (B, L) fixes the masks (as in MAE's ``random_masking``).
        """
        x = self.embed_patches(x)  # (B, L, D)
        B, L, _ = x.shape
        if mask_ratio == 0:
            mask = torch.zeros(B, L, device=x.device)
            ids_restore = torch.arange(L, device=x.device).expand(B, L)
        else:
            x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        return self._cls_and_blocks(x), mask, ids_restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + L, D) final-norm tokens, cls first, no masking."""
        return self._cls_and_blocks(self.embed_patches(x))

    def dense_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, H/p, W/p) final-norm patch tokens (not L2-normalized)."""
        gh, gw = self.patch_grid(x)
        tokens = self.forward(x)[:, 1:]  # (B, gh*gw, D), row-major
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, gh, gw)


# --------------------------------------------------------------------------------------------
# decoder


class CrossViewDecoderBlock(nn.Module):
    """CropMAE's DecoderBlock: post-norm cross-attention -> MLP -> self-attention, dropout 0.1.

    Parameter names follow ``nn.TransformerDecoderLayer`` (which the reference block copies), so
    reference decoder weights load unchanged.
    """

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int = 2048, dropout: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.activation = nn.GELU()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x (B, Lq, C) queries, memory (B, Lm, C) -> (B, Lq, C)."""
        # need_weights=False keeps attention on the fused SDPA path (no explicit QK^T matmul)
        cross = self.multihead_attn(x, memory, memory, need_weights=False)[0]
        x = self.norm2(x + self.dropout2(cross))
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))
        x = self.norm3(x + self.dropout3(ff))
        self_ = self.self_attn(x, x, x, need_weights=False)[0]
        return self.norm1(x + self.dropout1(self_))


# --------------------------------------------------------------------------------------------
# full model


class CrossViewMAE(nn.Module):
    """Target view masked at r_t, reconstructed from N anchors masked at r_a (CDG-MAE / CropMAE / SiamMAE).

    ``forward(views (B, 1+N, 3, H, W), target_mask, anchor_mask) -> (loss, pred (B, L, p*p*3), mask (B, L))``
    with view 0 the target and 1..N the anchors.
    """

    def __init__(
        self,
        arch: str | Mapping = "vit_small_patch16",
        img_size: int = 224,
        norm_pix_loss: bool = True,
        decoder_dropout: float = 0.1,
    ):
        super().__init__()
        self.arch = resolve_arch(arch)
        self.img_size = int(img_size)
        self.norm_pix_loss = norm_pix_loss
        a = self.arch
        self.encoder = build_encoder(a, img_size)
        self.patch_size = a["patch_size"]
        num_patches = self.encoder.grid_size**2
        dec = a["decoder_embed_dim"]

        self.decoder_embed = nn.Linear(a["embed_dim"], dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dec), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                CrossViewDecoderBlock(dec, a["decoder_num_heads"], a["decoder_ff"], dropout=decoder_dropout)
                for _ in range(a["decoder_depth"])
            ]
        )
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.decoder_pred = nn.Linear(dec, self.patch_size**2 * 3)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Spec §6: re-run over the whole model (SiameseMAE re-initializes after swapping decoders)."""
        self.encoder.initialize_weights()
        g = self.encoder.grid_size
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.arch["decoder_embed_dim"], g, g)[None])
        nn.init.normal_(self.mask_token, std=0.02)
        # every nn.Linear (incl. the MHA out_proj); MHA in_proj keeps torch's xavier / zero bias
        self.apply(_init_linear_and_norm)

    # -- MAE helpers ------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3) in (p, q, c) order."""
        p = self.patch_size
        B, C, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, C)
        return x.reshape(B, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, L, p*p*3) -> (B, 3, H, W); square grid unless ``grid=(h, w)`` is given."""
        p = self.patch_size
        B, L, _ = x.shape
        h, w = grid if grid is not None else (int(math.isqrt(L)),) * 2
        if h * w != L:
            raise ValueError(f"{L} patches do not form a {h}x{w} grid")
        x = x.reshape(B, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, h, p, w, q)
        return x.reshape(B, 3, h * p, w * p)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs (B, 3, H, W), pred (B, L, p*p*3), mask (B, L) 1 = removed -> scalar MSE on removed patches."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L) per-patch MSE, fp32 under autocast
        return (loss * mask).sum() / mask.sum()

    # -- encoder / decoder ----------------------------------------------------------------
    def forward_anchors(self, anchors: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """(B, N, 3, H, W) -> memory (B, N * (1 + keep), D): one batched encoder call over B*N views.

        Each anchor draws its own mask; tokens are concatenated anchor after anchor, cls included.
        """
        B, N = anchors.shape[:2]
        latent, _, _ = self.encoder.forward_masked(anchors.flatten(0, 1), mask_ratio)  # (B*N, 1+k, D)
        return latent.reshape(B, N * latent.shape[1], latent.shape[2])

    def decoder_tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid=None) -> torch.Tensor:
        """The decoder's input: latent (B, 1+k, D) (cls first) embedded, mask tokens appended, the
        shuffle undone, the decoder's position embedding added -> (B, 1+L, C)."""
        x = self.decoder_embed(latent)  # (B, 1+k, C)
        B, L = ids_restore.shape
        C = x.shape[-1]
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, C), cls excluded
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, C))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1)  # (B, 1+L, C)
        gh, gw = grid if grid is not None else (self.encoder.grid_size,) * 2
        return x + interpolate_pos_embed(self.decoder_pos_embed, gh, gw)

    def forward_decoder(
        self,
        target_latent: torch.Tensor,
        ids_restore: torch.Tensor,
        memory: torch.Tensor,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """target_latent (B, 1+k, D), ids_restore (B, L), memory (B, M, D) -> pred (B, L, p*p*3).

        ``grid`` = the target's patch grid (h, w) when it is not the pretraining one.
        """
        x = self.decoder_tokens(target_latent, ids_restore, grid)  # (B, 1+L, C)
        memory = self.decoder_embed(memory)  # (B, M, C); no decoder pos-embed on the memory
        for blk in self.decoder_blocks:
            x = blk(x, memory)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+L, p*p*3)
        return x[:, 1:]

    def forward(self, views: torch.Tensor, target_mask: float, anchor_mask: float = 0.0):
        if views.ndim != 5 or views.shape[1] < 2 or views.shape[2] != 3:
            raise ValueError(f"views must be (B, 1 + N, 3, H, W) with N >= 1, got {tuple(views.shape)}")
        for name, ratio in (("target_mask", target_mask), ("anchor_mask", anchor_mask)):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {ratio}")
        target, anchors = views[:, 0], views[:, 1:]
        # target first, then anchors: the RNG stream equals the reference's for N = 1, r_a = 0
        target_latent, mask, ids_restore = self.encoder.forward_masked(target, target_mask)
        memory = self.forward_anchors(anchors, anchor_mask)
        pred = self.forward_decoder(target_latent, ids_restore, memory, self.encoder.patch_grid(target))
        loss = self.forward_loss(target, pred, mask)
        return loss, pred, mask


# --------------------------------------------------------------------------------------------
# building


def build_encoder(arch: str | Mapping, img_size: int = 224) -> ViTEncoder:
    a = resolve_arch(arch)
    return ViTEncoder(
        img_size=img_size,
        patch_size=a["patch_size"],
        embed_dim=a["embed_dim"],
        depth=a["depth"],
        num_heads=a["num_heads"],
    )


def parameter_counts(model: CrossViewMAE) -> dict[str, int]:
    """Trainable parameters: encoder, decoder side (everything else), decoder blocks alone."""
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "encoder": sum(v for n, v in trainable if n.startswith("encoder.")),
        "decoder": sum(v for n, v in trainable if not n.startswith("encoder.")),
        "decoder_blocks": sum(v for n, v in trainable if n.startswith("decoder_blocks.")),
    }
