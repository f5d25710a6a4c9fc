"""The losses, masks and EMA teachers of the MAE-family objectives (``lut``, ``pseudo-mae``): pure
functions, pinned by ``tests/pretrain/test_models_mae_family.py`` on hand-computed cases. The models that use them
are ``pipeline.pretrain.models_mae_family``; the recipe (every hyper-parameter, its source section
and what is an assumption) is ``docs/recipe-mae-family.md``.

* LUT (Kim et al., ECCV 2024, §3 and its official code ``naver-ai/lut``): the broader
  contextualization loss ``lut_loss`` = 2 - 2 cos between the online side's pooled unmasked tokens
  (projector then predictor) and the momentum side's pooled tokens of the whole other view
  (projector), the "normalized l2 distance" of §3.0.5.
* Pseudo MAE (Nandam et al., §3.1-3.3): multifold masks (``multifold_masks``: the student's visible
  tokens and K folds that partition the tokens it masks, SdAE's multifold masking), the per-token
  normalisation of the reconstruction teacher's tokens (Eq. 2, ``normalize_tokens``), the cosine
  reconstruction loss (Eq. 1, ``feature_reconstruction_loss``), Sinkhorn-normalised teacher pseudo
  labels (``sinkhorn_knopp``), the nearest-teacher-patch targets of Eq. 3 (``nearest_targets``) and
  the cross-entropy H(teacher, student) of Eq. 3-4 (``soft_cross_entropy``).
* Teachers: ``frozen_copy`` (no gradients, ever) and ``ema_update`` (in place, under no_grad),
  with DINO's cosine momentum schedule ``cosine_schedule``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Eq. 2's epsilon: not given by the paper; SdAE's (and MAE's norm_pix_loss) value [assumption]
NORM_EPS = 1.0e-6


# ---------------------------------------------------------------------------------------------
# masks


def default_folds(n_tokens: int, n_keep: int) -> int:
    """K of multifold masking: as many folds of the student's size as the masked tokens hold
    (Pseudo MAE, Appendix A: 49 visible tokens, 147 masked = 3 folds of 49 at r = 0.75)."""
    return max(1, round((n_tokens - n_keep) / n_keep))


def multifold_masks(noise: torch.Tensor, n_keep: int, folds: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(ids_keep (B, n_keep), [fold ids (B, n_k)] * K) from one random permutation per sample.

    As MAE's ``random_masking``, ``argsort(noise)`` orders the tokens; the first ``n_keep`` are the
    student's visible tokens and the rest, the tokens it masks, are cut into K consecutive folds of
    (near-)equal size (``torch.tensor_split``). Visible tokens and folds partition ``range(L)``.
    """
    B, L = noise.shape
    if not 1 <= n_keep < L:
        raise ValueError(f"multifold masking keeps {n_keep} of {L} tokens; need 1 <= keep < {L}")
    if not 1 <= folds <= L - n_keep:
        raise ValueError(f"{folds} folds cannot split the {L - n_keep} masked tokens (pretrain.pseudo_mae.folds)")
    ids_shuffle = torch.argsort(noise, dim=1)
    return ids_shuffle[:, :n_keep], list(torch.tensor_split(ids_shuffle[:, n_keep:], folds, dim=1))


def disjoint_draws(noise: torch.Tensor, n_keep: int, draws: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([ids (B, n_keep)] * draws, ids_restore (B, L)): consecutive, hence disjoint, slices of one
    permutation per sample (LUT's code: view 1 keeps ``ids_shuffle[:, :keep]``, view 2
    ``ids_shuffle[:, keep:2 keep]``); ``ids_restore`` undoes the permutation for the first draw's decoder."""
    B, L = noise.shape
    if n_keep < 1 or draws * n_keep > L:
        raise ValueError(f"{draws} disjoint draws of {n_keep} tokens do not fit in {L}; lower the mask ratio")
    ids_shuffle = torch.argsort(noise, dim=1)
    slices = [ids_shuffle[:, k * n_keep : (k + 1) * n_keep] for k in range(draws)]
    return slices, torch.argsort(ids_shuffle, dim=1)


def mask_from_keep(ids_keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B, L) float mask, 1 = removed (MAE's convention), of the tokens ``ids_keep`` leaves out."""
    mask = torch.ones(ids_keep.shape[0], n_tokens, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), ids (B, n) -> (B, n, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------
# losses


def normalize_tokens(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Eq. 2: each token standardised over its channels, (t - mean(t)) / sqrt(var(t) + eps), with the
    unbiased variance as SdAE's code (``Tensor.var``) and MAE's norm_pix_loss compute it."""
    x = x.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + eps) ** 0.5


def feature_reconstruction_loss(
    pred: torch.Tensor, teacher_tokens: torch.Tensor, eps: float = NORM_EPS
) -> torch.Tensor:
    """Eq. 1 as a loss: 1 - the mean cosine similarity between the decoder's outputs at the masked
    tokens ``pred`` (..., D) and the reconstruction teacher's tokens at the same positions, normalised
    by Eq. 2 (SdAE's ``1 - cosine_similarity(...).mean()``). The teacher side carries no gradient."""
    target = normalize_tokens(teacher_tokens.detach(), eps)
    return 1.0 - F.cosine_similarity(pred.float(), target, dim=-1).mean()


def lut_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """LUT's broader contextualization loss (§3.0.5; ``loss_ftn`` of its code): the squared distance
    of the l2-normalised vectors, ``2 - 2 cos``, averaged over the batch; the teacher side is a target."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    return (2.0 - 2.0 * (s * t).sum(dim=-1)).mean()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher pseudo labels by Sinkhorn-Knopp (SwAV / iBOT / DINOv2's ``sinkhorn_knopp_teacher``):
    logits (N, K) -> assignments (N, K), every row a distribution, the K prototypes used equally
    over the N rows (all ranks' rows under DDP). Pseudo MAE §3.3 names "sinkhorn normalization"."""
    q = torch.exp(logits.float() / temperature).t()  # (K, N)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    n_rows, n_protos = q.shape[1] * world, q.shape[0]
    total = q.sum()
    if world > 1:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)  # per prototype
        if world > 1:
            dist.all_reduce(rows)
        q /= rows
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)  # per sample
        q /= n_rows
    q *= n_rows
    return q.t()


def soft_cross_entropy(target: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """H(target, student) = -sum_k target_k log softmax(student / T)_k, averaged over the rows: the
    teacher's distribution is the target (no gradient reaches it), the student's logits are scored."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(target.detach().float() * log_p).sum(dim=-1).mean()


@torch.no_grad()
def nearest_targets(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 3's P^_n: for each student token the label of its nearest teacher token, per sample.

    student (B, n, D) decoder outputs, teacher (B, m, D) teacher tokens of every fold, labels
    (B, m, K) -> (B, n, K). Nearest = the largest cosine similarity (the paper's "dist" in feature
    space is unspecified: cosine distance [assumption]). The product is a batched matmul, which the
    GFLOPs convention leaves uncounted like attention's QK^T (``pipeline.pretrain.flops``).
    """
    sim = torch.bmm(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1).transpose(1, 2))
    idx = sim.argmax(dim=-1)  # (B, n)
    return torch.gather(labels, 1, idx.unsqueeze(-1).expand(-1, -1, labels.shape[-1]))


# ---------------------------------------------------------------------------------------------
# teachers


def cosine_schedule(base: float, final: float, index: int, length: int) -> float:
    """DINO's ``cosine_scheduler`` at ``index`` of ``length``: ``base`` at 0, rising (or falling) along
    a half cosine towards ``final`` (reached one step after the last index)."""
    if length <= 0:
        return float(final)
    index = min(max(int(index), 0), length)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * index / length))


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: a deep copy whose parameters never require gradients (so the optimizer, which takes
    only parameters that do, and DDP's gradient sync leave it out), in eval mode."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, entry by entry of the state dicts
    (parameters and floating buffers such as BatchNorm's running statistics, as timm's ModelEma and
    LUT's code; integer buffers are copied). Runs without autograd."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if list(t_state) != list(s_state):
        raise KeyError(f"EMA teacher and student differ: {sorted(set(t_state) ^ set(s_state))[:5]}")
    for name, t in t_state.items():
        s = s_state[name].detach()
        if t.is_floating_point():
            t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
        else:
            t.copy_(s)
