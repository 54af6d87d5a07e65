"""Attention with gpt-oss's per-head sink logits, sliding windows and Llama 4's chunks, through SDPA.

A sink is a logit per head that joins each query's softmax and brings no value. SDPA takes it as
one more key, all zeros (its score is 0) with a zero value, whose mask entry is the head's sink
logit: the score plus the mask is the sink. The query heads that share a KV head are folded into
the query axis (as the cached path folds them), so SDPA sees as many heads as the cache has and
never copies keys per query head, and the mask can be any shape (CUDA's grouped-query kernels
take no mask). The mask is per head, [B, kvh, g * n, L + 1], so it is built for a slice of
sequences and queries at a time, at most MAX_MASK elements: a long prompt never builds a
[h, T, T] tensor, nor a large decode batch a [B, h, L] one. A sliding layer reads only the blocks
its window reaches (`AttentionGroup.window_blocks`); so does a chunked one (`LocalAttention`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.kv_cache import gather

if TYPE_CHECKING:
    from engine.attention import AttentionBatch, AttentionGroup
    from engine.family_config import LocalAttention

MAX_MASK = 1 << 24  # float elements of one slice's mask


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    window: LocalAttention | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Q, h, D], k [B, L, kvh, D], v [B, L, kvh, Dv], query_pos [B, Q] -> [B, Q, h, Dv].
    Key j of sequence b is at position key_start[b] + j (key_start [B], 0 when None). A query at
    position p sees the keys at positions <= p, and with a window only those from
    `window.first_key(p)` on; keys past a sequence's context are padding and never seen. `sinks` [h]: a
    logit per head that takes its share of each softmax and contributes no value."""
    b, q_len, heads, dim = q.shape
    width, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    groups = heads // kv_heads
    keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B, kvh, L, D], [B, kvh, L, Dv]
    if sinks is not None:  # one more key and value, zero: the sink's column
        keys = torch.cat((keys, keys.new_zeros(b, kv_heads, 1, dim)), dim=2)
        values = torch.cat((values, values.new_zeros(b, kv_heads, 1, value_dim)), dim=2)
    key_pos = torch.arange(width, device=q.device).expand(b, width)  # [B, L]
    if key_start is not None:
        key_pos = key_pos + key_start[:, None]
    queries = q.view(b, q_len, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)  # [B, kvh, g, Q, D]
    per_query = heads * keys.shape[2]  # mask elements of one query of one sequence
    seqs = max(1, min(b, MAX_MASK // per_query))
    span = max(1, MAX_MASK // (seqs * per_query))
    out = q.new_empty(b, kv_heads, groups, q_len, value_dim)
    for lo in range(0, b, seqs):
        rows = slice(lo, lo + seqs)
        for first in range(0, q_len, span):
            cols = slice(first, first + span)
            pos = query_pos[rows, cols, None]  # [b', n, 1]
            allowed = key_pos[rows, None, :] <= pos  # [b', n, L]
            if window is not None:
                allowed &= key_pos[rows, None, :] >= window.first_key(pos)
            n = allowed.shape[1]
            mask = q.new_empty(allowed.shape[0], kv_heads, groups, n, keys.shape[2])
            mask[..., :width] = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(
                ~allowed[:, None, None], float("-inf")
            )
            if sinks is not None:
                mask[..., width] = sinks.to(q.dtype).view(1, kv_heads, groups, 1)
            qs = queries[rows, :, :, cols].reshape(-1, kv_heads, groups * n, dim)
            o = F.scaled_dot_product_attention(
                qs, keys[rows], values[rows], attn_mask=mask.flatten(2, 3), scale=scale
            )  # [b', kvh, g * n, Dv]
            out[rows, :, :, cols] = o.view(-1, kv_heads, groups, n, value_dim)
    return out.permute(0, 3, 1, 2, 4).reshape(b, q_len, heads, value_dim)


def sink_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    batch: AttentionBatch,
    g: AttentionGroup,
    scale: float | None,
    sinks: torch.Tensor | None,
    window: LocalAttention | None,
) -> torch.Tensor:
    """One group through `sink_attention`: a first chunk over its own keys, the others over
    their gathered context (a local layer's, only the blocks its window reaches).
    -> [B*Q, h, Dv]."""
    heads, dim, value_dim = q.shape[1], q.shape[2], v.shape[2]
    scale = dim**-0.5 if scale is None else scale
    if g.blocks is None:  # a prompt's first chunk: positions 0..n-1, keys from the step
        qg, kg, vg = (t[g.rows][None] for t in (q, k, v))  # [1, n, heads, D]
        pos = torch.arange(qg.shape[1], device=q.device)[None]  # [1, n]
        return sink_attention(qg, kg, vg, pos, scale, sinks, window)[0]
    assert g.positions is not None
    (b, q_len), bs = g.positions.shape, batch.kv.block_size
    blocks, key_start = g.blocks, None
    if window is not None and g.window_blocks is not None:
        blocks, key_start = g.window_blocks, g.window_start
    kv_heads = k.shape[1]
    kg = gather(batch.kv.k[layer], blocks, bs, q.dtype).view(b, -1, kv_heads, dim)
    if batch.kv.v:
        vg = gather(batch.kv.v[layer], blocks, bs, q.dtype).view(b, -1, kv_heads, value_dim)
    else:
        vg = kg[..., :value_dim]
    qg = q[g.rows].view(b, q_len, heads, dim)
    out = sink_attention(qg, kg, vg, g.positions, scale, sinks, window, key_start)
    return out.reshape(b * q_len, heads, value_dim)  # [B*Q, h, Dv]
