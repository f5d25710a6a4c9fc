"""The reference's straightforward label propagation: the oracle of the equivalence tests and the benchmark.

Not part of the package (runs use ``pipeline.propagation.algorithm.propagate``); kept here so the fast
path can be checked against the reference's design, quirk for quirk (spec §1 and §4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.propagation.algorithm import MASKED_LOGIT, check_grid, radius_mask


def propagate_reference(
    features, first_labels, grid, *, topk, temperature, radius, queue, frame_chunk=2, cell_chunk=100
):
    """The reference's straightforward algorithm, for tests and the benchmark (not for runs).

    Host key bank: ``queue`` padded copies of frame 0 prepended, the (T, 1 + queue, hw, C) context
    features gathered on the host per 2-frame chunk, an additive -1e10 radius mask on the
    short-term slots, and 100-query-cell chunks; top-k/softmax over the concatenated slot axis.
    """
    n_frames, hw, _ = features.shape
    grid = check_grid(features, grid)
    feats = features.detach().cpu()
    padded = torch.cat([feats[:1].expand(queue, -1, -1), feats])  # (queue + T, hw, C)
    n_query = n_frames
    # slot table: query t (padded index t + queue) -> long slot 0 + padded indices t .. t+queue-1
    key_index = torch.cat(
        [torch.zeros(n_query, 1, dtype=torch.long), torch.arange(queue)[None] + torch.arange(n_query)[:, None]], dim=1
    )
    additive = torch.zeros(hw, hw, dtype=feats.dtype)
    additive[~radius_mask(grid, radius)] = MASKED_LOGIT
    weights_all, index_all = [], []
    for f0 in range(0, n_query, frame_chunk):
        keys = padded[key_index[f0 : f0 + frame_chunk]]  # (F, 1 + queue, hw, C) host key bank
        query = padded[queue + f0 : queue + f0 + frame_chunk]  # (F, hw, C)
        w_chunks, i_chunks = [], []
        for c0 in range(0, hw, cell_chunk):
            aff = torch.einsum("fskc,fqc->fskq", keys, query[:, c0 : c0 + cell_chunk])
            aff[:, 1:] += additive[:, c0 : c0 + cell_chunk]  # short-term slots only
            n_f, n_s, _, n_q = aff.shape
            aff = aff.reshape(n_f, n_s * hw, n_q) / temperature
            w, i = aff.topk(min(topk, n_s * hw), dim=1)
            w_chunks.append(F.softmax(w, dim=1))
            i_chunks.append(i)
        weights_all.extend(torch.cat(w_chunks, dim=-1))
        index_all.extend(torch.cat(i_chunks, dim=-1))
    labels = torch.zeros(queue + n_frames, hw, first_labels.shape[-1], dtype=feats.dtype)
    labels[: queue + 1] = first_labels.detach().cpu().to(feats.dtype)
    for t in range(1, n_frames):
        ctx = labels[key_index[t]].reshape(-1, labels.shape[-1])  # (S*hw, L)
        labels[queue + t] = (ctx[index_all[t]] * weights_all[t][..., None]).sum(0)
    return labels[queue:]
