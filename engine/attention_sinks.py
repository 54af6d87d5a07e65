"""Attention with gpt-oss's per-head sink logits and sliding windows, through SDPA.

A sink is a logit per head that joins each query's softmax and brings no value. SDPA takes it as
one more key, all zeros (its score is 0) with a zero value, whose mask entry is the head's sink
logit: the score plus the mask is the sink. The mask is then per head, [B, h, n, L + 1], so it is
built for a slice of queries at a time, at most MAX_MASK elements (a long prompt never builds a
[h, T, T] tensor). SDPA's fused kernel, not the attention written out (scores, softmax, values),
is what the CPU and GPU run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_MASK = 1 << 24  # float elements of one slice's mask


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q [B, Q, h, D], k [B, L, kvh, D], v [B, L, kvh, Dv] (key j of each sequence at position j),
    query_pos [B, Q] -> [B, Q, h, Dv]. A query at position p sees the keys at positions <= p, and
    with a window only the last `window` of them (itself included); keys past a sequence's
    context are padding and never seen. `sinks` [h]: a logit per head that takes its share of
    each softmax and contributes no value."""
    b, q_len, heads, _ = q.shape
    width, kv_heads = k.shape[1], k.shape[2]
    keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B, kvh, L, D], [B, kvh, L, Dv]
    if sinks is not None:  # one more key and value, zero: the sink's column
        keys = torch.cat((keys, keys.new_zeros(b, kv_heads, 1, keys.shape[-1])), dim=2)
        values = torch.cat((values, values.new_zeros(b, kv_heads, 1, values.shape[-1])), dim=2)
    key_pos = torch.arange(width, device=q.device)  # [L]
    span = max(1, MAX_MASK // (b * heads * (width + 1)))
    parts = []
    for lo in range(0, q_len, span):
        pos = query_pos[:, lo : lo + span, None]  # [B, n, 1]
        allowed = key_pos <= pos  # [B, n, L]
        if window is not None:
            allowed &= key_pos > pos - window
        n = allowed.shape[1]
        mask = q.new_empty(b, heads, n, keys.shape[2])  # [B, h, n, L (+1)]
        mask[..., :width] = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(
            ~allowed[:, None], float("-inf")
        )
        if sinks is not None:
            mask[..., width] = sinks.to(q.dtype)[None, :, None]
        qs = q[:, lo : lo + span].transpose(1, 2)  # [B, h, n, D]
        out = F.scaled_dot_product_attention(
            qs, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
        parts.append(out.transpose(1, 2))  # [B, n, h, Dv]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
