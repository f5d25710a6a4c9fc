"""Single-view MAE-family pretraining models on the same ViT encoder as the cross-view MAE:
``mae`` (He et al.), ``lut`` (Learning with Unmasked Tokens) and ``pseudo-mae`` (Nandam et al.).

All three take the trainer's call ``forward(views (B, V, 3, H, W), target_mask, anchor_mask=0) ->
(loss, pred, mask)`` like ``CrossViewMAE`` (``target_mask`` = the masking ratio of the masked view;
there are no anchors), hold the student encoder as ``.encoder`` (a ``ViTEncoder``: the released
checkpoint is MAE-compatible like ours) and keep their EMA teachers under ``teacher_prefixes``:
frozen copies (``requires_grad=False``, so out of the optimizer), in eval mode, updated in place
without gradients by ``update_teachers`` (called by the trainer after every optimizer step), saved
with the model in the resumable state and dropped from the exported checkpoint
(``export_state_dict``). Views come from ``pipeline.pretrain.mae_family_data``:

* ``mae``: V = 1, the MAE-augmented image. Loss: normalised-pixel MSE on the masked patches.
* ``lut``: V = 2 simple-resized-crop views, the second also colour-jittered and three-augmented
  (LUT §3.0.4, §5.1.2). As LUT's code: the student encodes view 1's visible tokens and view 2's
  (a disjoint draw of the same size from the same permutation); MAE's decoder reconstructs view 1's
  masked pixels; each view's pooled visible tokens go through the projector and predictor
  (2-layer MLPs, hidden ``head_mlp_dim``, BatchNorm, ReLU, output = embed dim) and are matched by
  ``lut_loss`` to the momentum encoder + projector's pooled tokens of the *other* whole view.
  L = L_MAE + weight x L_bc (Eq. 3).
* ``pseudo-mae``: V = 2, view 0 simply (MAE-) augmented, view 1 complex (DINO-) augmented
  (§3.1). The decoder predicts embed-dim tokens; the student's visible tokens and K folds of its
  masked tokens partition the grid (``multifold_masks``). The reconstruction teacher (EMA per
  epoch) encodes view 0's folds; Eq. 1 regresses the decoder's masked outputs to its Eq. 2-normalised
  tokens. The pseudo-labelling teacher (EMA per iteration, encoder + heads) encodes view 1's folds
  (the same token indices) with a class token per fold; its DINO-style heads' Sinkhorn-normalised
  outputs are the patch (P^k) and class (C^k) pseudo labels. The student's heads project the
  decoder's masked outputs (P~) and its class-token output (C~); each P~_n is matched to the
  nearest teacher patch over all folds (Eq. 3) and C~ to the folds' mean class label (Eq. 4).
  L = lambda_m L_m + lambda_c L_c + lambda_p L_p (Eq. 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from pipeline.pretrain.models_mae import (
    CrossViewMAE,
    _init_linear_and_norm,
    build_encoder,
    resolve_arch,
)
from pipeline.pretrain.objectives import (
    cosine_schedule,
    default_folds,
    disjoint_draws,
    ema_update,
    feature_reconstruction_loss,
    frozen_copy,
    gather_tokens,
    lut_loss,
    mask_from_keep,
    multifold_masks,
    nearest_targets,
    sinkhorn_knopp,
    soft_cross_entropy,
)

# the methods of this module; the others (cdgmae, cropmae, siammae) train ``CrossViewMAE``
MAE_FAMILY = ("mae", "lut", "pseudo-mae")


class WithTeachers(nn.Module):
    """EMA teachers under ``teacher_prefixes`` stay in eval mode whatever ``train()`` is asked (LUT's
    momentum network is ``.eval()``: its BatchNorm uses the EMA of the student's running
    statistics); ``update_teachers`` runs after every optimizer step (none by default)."""

    teacher_prefixes: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for prefix in self.teacher_prefixes:
            getattr(self, prefix.rstrip(".")).eval()
        return self

    def update_teachers(self, step: int, steps_per_epoch: int, epochs: int) -> None:
        """EMA updates after optimizer step ``step`` (1-based count of the steps done)."""


class MaskedAutoencoder(WithTeachers):
    """He et al.'s MAE on our ``ViTEncoder``: the method ``mae``, and the student of ``lut`` and
    ``pseudo-mae``. The decoder is MAE's (linear embedding, mask token, fixed sin-cos position
    embedding, pre-norm self-attention ``Block`` s with MLP ratio 4, LayerNorm, linear prediction)
    with the arch's decoder width, depth and heads; its parameter names are MAE's."""

    method = "mae"
    n_views = 1

    def __init__(
        self,
        arch: str | Mapping = "vit_small_patch16",
        img_size: int = 224,
        norm_pix_loss: bool = True,
        pred_dim: int | None = None,
    ):
        super().__init__()
        self.arch = resolve_arch(arch)
        self.img_size, self.norm_pix_loss = int(img_size), bool(norm_pix_loss)
        a = self.arch
        self.encoder = build_encoder(a, img_size)
        self.patch_size = a["patch_size"]
        dec, n = a["decoder_embed_dim"], self.encoder.grid_size**2
        self.decoder_embed = nn.Linear(a["embed_dim"], dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dec), requires_grad=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            [Block(dec, a["decoder_num_heads"], 4.0, qkv_bias=True, norm_layer=norm) for _ in range(a["decoder_depth"])]
        )
        self.decoder_norm = norm(dec)
        self.decoder_pred = nn.Linear(dec, pred_dim or self.patch_size**2 * 3)
        self.initialize_weights()

    # MAE's init (the encoder's own, sin-cos decoder positions, N(0, 0.02) mask token, xavier Linear
    # layers, heads included, with zero biases, LayerNorm 1 / 0), patchify and normalised-pixel loss
    # on the removed patches: CrossViewMAE's, on the same attribute names
    initialize_weights = CrossViewMAE.initialize_weights
    patchify = CrossViewMAE.patchify
    forward_loss = CrossViewMAE.forward_loss
    decoder_tokens = CrossViewMAE.decoder_tokens

    # -- pieces -----------------------------------------------------------------------------
    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid=None) -> torch.Tensor:
        """latent (B, 1 + k, D) (cls first), ids_restore (B, L) -> (B, 1 + L, pred_dim), cls row kept."""
        x = self.decoder_tokens(latent, ids_restore, grid)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def check_views(self, views: torch.Tensor, mask_ratio: float) -> None:
        if views.ndim != 5 or views.shape[1] != self.n_views or views.shape[2] != 3:
            raise ValueError(f"method {self.method} takes views (B, {self.n_views}, 3, H, W), got {tuple(views.shape)}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"method {self.method}: the mask ratio (cell target_mask) must be in (0, 1), got {mask_ratio}"
            )

    def forward(self, views: torch.Tensor, target_mask: float, anchor_mask: float = 0.0):
        self.check_views(views, target_mask)
        imgs = views[:, 0]
        latent, mask, ids_restore = self.encoder.forward_masked(imgs, target_mask)
        pred = self.forward_decoder(latent, ids_restore, self.encoder.patch_grid(imgs))[:, 1:]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def byol_mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    """LUT's ``_build_mlp`` with depth 2: Linear (no bias) -> BatchNorm1d -> ReLU -> Linear (no bias)."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False),
    )


class LUTHeads(WithTeachers):
    """LUT's heads over a masked autoencoder (the next class in the MRO: ``MaskedAutoencoder`` for
    ``lut``, ``CrossViewMAE`` for ``cdgmae-lut``): the online projector and predictor (``byol_mlp``,
    hidden ``head_mlp_dim``) and the momentum network (encoder + projector) under ``teacher.``,
    weighted by ``weight`` in the loss."""

    teacher_prefixes = ("teacher.",)

    def __init__(
        self,
        arch="vit_small_patch16",
        img_size: int = 224,
        norm_pix_loss: bool = True,
        *,
        weight: float = 1.0,
        momentum: float = 0.996,
        head_mlp_dim: int = 4096,
    ):
        super().__init__(arch, img_size, norm_pix_loss)
        D = self.arch["embed_dim"]
        self.weight, self.momentum = float(weight), float(momentum)
        self.projector = byol_mlp(D, head_mlp_dim, D)
        self.predictor = byol_mlp(D, head_mlp_dim, D)
        for head in (self.projector, self.predictor):  # LUT's code: MAE's init over the heads too
            head.apply(_init_linear_and_norm)
        # the momentum network starts as a copy of the initialised online one (LUT's ModelEma)
        self.teacher = frozen_copy(nn.ModuleDict({"encoder": self.encoder, "projector": self.projector}))

    def update_teachers(self, step: int, steps_per_epoch: int, epochs: int) -> None:
        """Per iteration, momentum ``momentum`` -> 1 along a cosine over all steps (LUT's code)."""
        m = cosine_schedule(self.momentum, 1.0, step - 1, steps_per_epoch * epochs)
        ema_update(self.teacher["encoder"], self.encoder, m)
        ema_update(self.teacher["projector"], self.projector, m)

    def online_prediction(self, latent: torch.Tensor) -> torch.Tensor:
        """Encoder output (n, 1 + k, D) -> predictor(projector(mean of the visible tokens)) (n, D)."""
        return self.predictor(self.projector(latent[:, 1:].mean(dim=1)))


class LUT(LUTHeads, MaskedAutoencoder):
    """Learning with Unmasked Tokens (§3): MAE + the broader contextualization loss to a momentum network."""

    method = "lut"
    n_views = 2

    def forward(self, views: torch.Tensor, target_mask: float, anchor_mask: float = 0.0):
        self.check_views(views, target_mask)
        v1, v2 = views[:, 0], views[:, 1]
        enc = self.encoder
        x1, x2 = enc.embed_patches(v1), enc.embed_patches(v2)
        B, L = int(x1.shape[0]), int(x1.shape[1])
        keep = int(L * (1 - target_mask))
        try:
            (ids1, ids2), ids_restore = disjoint_draws(torch.rand(B, L, device=x1.device), keep, 2)
        except ValueError as err:
            raise ValueError(f"lut: mask ratio {target_mask} (cell target_mask): {err}") from None
        # the two masked views through the student in one call (LayerNorm only: batching is exact)
        latent = enc._cls_and_blocks(torch.cat([gather_tokens(x1, ids1), gather_tokens(x2, ids2)]))
        latent1, latent2 = latent[:B], latent[B:]
        pred = self.forward_decoder(latent1, ids_restore, enc.patch_grid(v1))[:, 1:]
        mask = mask_from_keep(ids1, L)
        mae = self.forward_loss(v1, pred, mask)
        # online heads view by view (BatchNorm statistics per view, as LUT's code)
        q1, q2 = self.online_prediction(latent1), self.online_prediction(latent2)
        with torch.no_grad():
            full = self.teacher["encoder"](torch.cat([v1, v2]))[:, 1:].mean(dim=1)  # whole images
            t1, t2 = self.teacher["projector"](full[:B]), self.teacher["projector"](full[B:])
        bc = 0.5 * (lut_loss(q2, t1) + lut_loss(q1, t2))  # each student view against the other teacher view
        self.last_terms = {"mae": mae.detach(), "bc": bc.detach()}  # the two terms, for inspection
        return mae + self.weight * bc, pred, mask


class PrototypeHead(nn.Module):
    """DINO's projection head: 3-layer MLP (GELU) to a bottleneck, l2 normalisation, then the
    prototypes as a weight-normalised linear layer with unit norms (DINO's norm_last_layer=True),
    i.e. cosine logits."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        for m in self.mlp:  # DINOHead's init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


def _fold_forward(encoder, x: torch.Tensor, folds: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each fold of the embedded tokens x (B, L, D), with the class token prepended, through the
    encoder's blocks: [(B, 1 + n_k, D)] (one batched call when the folds are equally long)."""
    parts = [gather_tokens(x, f) for f in folds]
    if len({p.shape[1] for p in parts}) == 1:
        return list(encoder._cls_and_blocks(torch.cat(parts)).chunk(len(parts)))
    return [encoder._cls_and_blocks(p) for p in parts]


class PseudoMAE(MaskedAutoencoder):
    """Pseudo MAE (§3.1-3.3): feature reconstruction to an EMA teacher with multifold masking, and
    multifold patch / class pseudo labelling against a second EMA teacher on a complex view."""

    method = "pseudo-mae"
    n_views = 2
    teacher_prefixes = ("teacher_rec.", "teacher_cl.")

    def __init__(
        self,
        arch="vit_small_patch16",
        img_size: int = 224,
        *,
        lambda_m: float = 1.0,
        lambda_c: float = 1.0,
        lambda_p: float = 1.0,
        folds: int | None = None,
        rec_momentum=(0.96, 0.99),
        cl_momentum=(0.996, 1.0),
        out_dim: int = 4096,
        head_hidden: int = 2048,
        head_bottleneck: int = 256,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        sinkhorn_iterations: int = 3,
    ):
        D = resolve_arch(arch)["embed_dim"]
        super().__init__(arch, img_size, norm_pix_loss=False, pred_dim=D)  # the decoder predicts tokens
        self.lambdas = (float(lambda_m), float(lambda_c), float(lambda_p))
        self.folds = folds
        self.rec_momentum, self.cl_momentum = tuple(rec_momentum), tuple(cl_momentum)
        self.student_temp, self.teacher_temp, self.sinkhorn_iterations = (
            student_temp,
            teacher_temp,
            int(sinkhorn_iterations),
        )
        self.patch_head = PrototypeHead(D, head_hidden, head_bottleneck, out_dim)
        self.class_head = PrototypeHead(D, head_hidden, head_bottleneck, out_dim)
        self.teacher_rec = frozen_copy(self.encoder)
        self.teacher_cl = frozen_copy(
            nn.ModuleDict({"encoder": self.encoder, "patch_head": self.patch_head, "class_head": self.class_head})
        )

    def update_teachers(self, step: int, steps_per_epoch: int, epochs: int) -> None:
        """Pseudo-labelling teacher every iteration (momentum cl_momentum[0] -> [1], cosine over all
        steps); reconstruction teacher at the end of every epoch (rec_momentum[0] -> [1], cosine over
        the epochs) (§3.2, Appendix A)."""
        m = cosine_schedule(*self.cl_momentum, step - 1, steps_per_epoch * epochs)
        ema_update(self.teacher_cl["encoder"], self.encoder, m)
        ema_update(self.teacher_cl["patch_head"], self.patch_head, m)
        ema_update(self.teacher_cl["class_head"], self.class_head, m)
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch - 1  # the epoch that just ended
            ema_update(self.teacher_rec, self.encoder, cosine_schedule(*self.rec_momentum, epoch, epochs))

    def masks(self, B: int, L: int, mask_ratio: float, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, L = int(B), int(L)  # plain ints, also under a tracer (the FLOP count)
        keep = int(L * (1 - mask_ratio))
        if keep < 1:
            raise ValueError(f"pseudo-mae: mask ratio {mask_ratio} keeps no token of {L}")
        return multifold_masks(torch.rand(B, L, device=device), keep, self.folds or default_folds(L, keep))

    def forward(self, views: torch.Tensor, target_mask: float, anchor_mask: float = 0.0):
        self.check_views(views, target_mask)
        simple, complex_ = views[:, 0], views[:, 1]
        enc = self.encoder
        x = enc.embed_patches(simple)
        B, L, _ = x.shape
        ids_keep, folds = self.masks(B, L, target_mask, x.device)
        masked = torch.cat(folds, dim=1)  # (B, L - keep): the masked tokens, fold after fold
        ids_restore = torch.argsort(torch.cat([ids_keep, masked], dim=1), dim=1)
        out = self.forward_decoder(enc._cls_and_blocks(gather_tokens(x, ids_keep)), ids_restore, enc.patch_grid(simple))
        pred = gather_tokens(out[:, 1:], masked)  # X~ at the masked tokens (B, L - keep, D)
        with torch.no_grad():
            # reconstruction teacher: the simple view's folds; targets aligned with ``masked``
            rec = torch.cat(
                [o[:, 1:] for o in _fold_forward(self.teacher_rec, self.teacher_rec.embed_patches(simple), folds)], 1
            )
            # pseudo-labelling teacher: the complex view's folds, a class token per fold
            tcl = self.teacher_cl
            outs = _fold_forward(tcl["encoder"], tcl["encoder"].embed_patches(complex_), folds)
            t_patch = torch.cat([o[:, 1:] for o in outs], dim=1)  # (B, L - keep, D)
            t_cls = torch.stack([o[:, 0] for o in outs], dim=1)  # (B, K, D)
            n_out = tcl["patch_head"].prototypes.shape[0]
            P = sinkhorn_knopp(tcl["patch_head"](t_patch).flatten(0, 1), self.teacher_temp, self.sinkhorn_iterations)
            C = sinkhorn_knopp(tcl["class_head"](t_cls).flatten(0, 1), self.teacher_temp, self.sinkhorn_iterations)
            P, C = P.view(B, -1, n_out), C.view(B, -1, n_out)
        loss_m = feature_reconstruction_loss(pred, rec)  # Eq. 1-2
        loss_p = soft_cross_entropy(
            nearest_targets(pred, t_patch, P), self.patch_head(pred), self.student_temp
        )  # Eq. 3
        loss_c = soft_cross_entropy(C.mean(dim=1), self.class_head(out[:, 0]), self.student_temp)  # Eq. 4
        lm, lc, lp = self.lambdas
        self.last_terms = {"m": loss_m.detach(), "c": loss_c.detach(), "p": loss_p.detach()}
        mask = mask_from_keep(ids_keep, L)
        return lm * loss_m + lc * loss_c + lp * loss_p, out[:, 1:], mask


class CrossViewLUT(LUTHeads, CrossViewMAE):
    """``cdgmae-lut``: CDG-MAE (``CrossViewMAE``, unchanged: same init, masks and loss) plus LUT's
    broader contextualization loss on the anchors' unmasked tokens. Each anchor's visible tokens,
    pooled, go through the projector and predictor and are matched (2 - 2 cos) to the momentum
    encoder + projector's pooled tokens of the whole target view: the bag's other view of the image
    plays LUT's "whole image under its own augmentation". One teacher pass per sample (the target).
    L = L_CDG-MAE + weight x L_bc; settings ``pretrain.lut``."""

    method = "cdgmae-lut"

    def forward(self, views: torch.Tensor, target_mask: float, anchor_mask: float = 0.0):
        if views.ndim != 5 or views.shape[1] < 2 or views.shape[2] != 3:
            raise ValueError(f"views must be (B, 1 + N, 3, H, W) with N >= 1, got {tuple(views.shape)}")
        target, anchors = views[:, 0], views[:, 1:]
        B, N = anchors.shape[:2]
        # CrossViewMAE.forward's draws, in its order: the target's mask, then the anchors'
        target_latent, mask, ids_restore = self.encoder.forward_masked(target, target_mask)
        latent, _, _ = self.encoder.forward_masked(anchors.flatten(0, 1), anchor_mask)  # (B*N, 1+k, D)
        memory = latent.reshape(B, N * latent.shape[1], latent.shape[2])
        pred = self.forward_decoder(target_latent, ids_restore, memory, self.encoder.patch_grid(target))
        mae = self.forward_loss(target, pred, mask)
        q = self.online_prediction(latent)  # (B*N, D)
        with torch.no_grad():
            t = self.teacher["projector"](self.teacher["encoder"](target)[:, 1:].mean(dim=1))  # (B, D)
        bc = lut_loss(q, t.repeat_interleave(N, dim=0))
        self.last_terms = {"mae": mae.detach(), "bc": bc.detach()}
        return mae + self.weight * bc, pred, mask


# ---------------------------------------------------------------------------------------------
# building, exporting, counting


def build_pretrain_model(cell: Mapping, settings: Mapping) -> nn.Module:
    """The model a cell trains: the MAE family's for ``mae`` / ``lut`` / ``pseudo-mae`` (settings
    ``pretrain.lut``, ``pretrain.pseudo_mae``), ``CrossViewLUT`` for ``cdgmae-lut``, ``CrossViewMAE``
    for every other method."""
    method, arch, size = cell["method"], cell["arch"], settings["img_size"]
    if method == "mae":
        return MaskedAutoencoder(arch, size, norm_pix_loss=settings["norm_pix_loss"])
    if method in ("lut", "cdgmae-lut"):
        s = settings["lut"]
        return (LUT if method == "lut" else CrossViewLUT)(
            arch,
            size,
            settings["norm_pix_loss"],
            weight=s["weight"],
            momentum=s["momentum"],
            head_mlp_dim=s["head_mlp_dim"],
        )
    if method == "pseudo-mae":
        s = settings["pseudo_mae"]
        return PseudoMAE(
            arch,
            size,
            lambda_m=s["lambda_m"],
            lambda_c=s["lambda_c"],
            lambda_p=s["lambda_p"],
            folds=s["folds"],
            rec_momentum=s["rec_momentum"],
            cl_momentum=s["cl_momentum"],
            out_dim=s["out_dim"],
            head_hidden=s["head_hidden"],
            head_bottleneck=s["head_bottleneck"],
            student_temp=s["student_temp"],
            teacher_temp=s["teacher_temp"],
            sinkhorn_iterations=s["sinkhorn_iterations"],
        )
    return CrossViewMAE(arch, size, norm_pix_loss=settings["norm_pix_loss"])


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without its EMA teachers: what the released checkpoint holds (the
    resumable state keeps them)."""
    prefixes = tuple(getattr(model, "teacher_prefixes", ()))
    return {k: v for k, v in model.state_dict().items() if not (prefixes and k.startswith(prefixes))}


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameters (student: encoder, decoder, heads) and the EMA teachers' parameters."""
    prefixes = tuple(getattr(model, "teacher_prefixes", ()))
    # the teachers' EMA-tracked parameters; their fixed sin-cos tables are left out like the student's
    teacher = sum(
        p.numel()
        for n, p in model.named_parameters()
        if prefixes and n.startswith(prefixes) and not n.endswith("pos_embed")
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    return {"trainable": trainable, "encoder": encoder, "teachers": teacher}
