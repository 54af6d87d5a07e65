"""Attention written out (scores, mask, softmax, values) for what SDPA cannot express: gpt-oss's
per-head sink logits and sliding windows. The scores of a slice of queries at a time are held
in float32, at most MAX_SCORES elements, so a long prompt never builds a [h, T, T] tensor."""

from __future__ import annotations

import torch

MAX_SCORES = 1 << 24  # float32 elements of one slice's scores


def eager_attention(
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
    b, q_len, heads, dim = q.shape
    width, kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    groups = heads // kv_heads
    keys = k.permute(0, 2, 1, 3)[:, :, None]  # [B, kvh, 1, L, D]
    values = v.permute(0, 2, 1, 3)[:, :, None]  # [B, kvh, 1, L, Dv]
    queries = q.view(b, q_len, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)  # [B, kvh, g, Q, D]
    key_pos = torch.arange(width, device=q.device)  # [L]
    sink = None if sinks is None else sinks.float().view(1, kv_heads, groups, 1, 1)
    span = max(1, MAX_SCORES // (b * heads * width))
    parts = []
    for lo in range(0, q_len, span):
        pos = query_pos[:, lo : lo + span, None]  # [B, n, 1]
        allowed = key_pos <= pos  # [B, n, L]
        if window is not None:
            allowed &= key_pos > pos - window
        scores = (queries[:, :, :, lo : lo + span] @ keys.transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))  # [B, kvh, g, n, L]
        if sink is not None:
            scores = torch.cat((scores, sink.expand(*scores.shape[:-1], 1)), dim=-1)
        probs = scores.softmax(dim=-1)[..., :width].to(v.dtype)
        parts.append(probs @ values)  # [B, kvh, g, n, Dv]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)  # [B, kvh, g, Q, Dv]
    return out.permute(0, 3, 1, 2, 4).reshape(b, q_len, heads, value_dim)
