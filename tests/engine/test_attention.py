"""engine/attention.py against plain causal attention over each sequence's full context: one step
mixing decodes, a prompt's first chunk and a later chunk, in an order that makes the decode rows
non-contiguous, with blocks scattered over the cache and grouped query heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import AttentionBatch, KVCache, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 8, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [n, h, D] for positions start..start+n-1; k/v [start+n, kvh, D] the whole context."""
    groups = HEADS // KV_HEADS
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # [C, h, D]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / DIM**0.5  # [h, n, C]
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), v.double())  # [n, h, D]


def test_mixed_step_matches_full_attention() -> None:
    torch.manual_seed(0)
    kv = KVCache.allocate(1, 64, BLOCK, KV_HEADS, DIM, torch.float32, "cpu")
    # (cached tokens, new tokens) per sequence: decode, first chunk, decode, later chunk, decode
    plan = [(9, 1), (0, 7), (3, 1), (6, 5), (13, 1)]
    blocks = iter(torch.randperm(64).tolist())  # scattered, never in order
    tables = [[next(blocks) for _ in range(-(-(a + n) // BLOCK))] for a, n in plan]
    contexts = [
        (torch.randn(a + n, KV_HEADS, DIM), torch.randn(a + n, KV_HEADS, DIM)) for a, n in plan
    ]
    for (a, _), table, (k, v) in zip(plan, tables, contexts, strict=True):  # cache what is cached
        slots = torch.tensor(
            [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(a)], dtype=torch.long
        )
        kv.k[0][slots], kv.v[0][slots] = k[:a], v[:a]
    q = torch.randn(sum(n for _, n in plan), HEADS, DIM)  # [T, h, D]
    new_k = torch.cat([k[a:] for (a, _), (k, _) in zip(plan, contexts, strict=True)])
    new_v = torch.cat([v[a:] for (a, _), (_, v) in zip(plan, contexts, strict=True)])
    batch = AttentionBatch.build(kv, tables, [a for a, _ in plan], [n for _, n in plan], "cpu")
    assert any(g.blocks is None for g in batch.groups)  # the first chunk reads no cache
    assert any(isinstance(g.rows, torch.Tensor) for g in batch.groups)  # decodes are split up
    out = paged_attention(q, new_k, new_v, 0, batch)
    row = 0
    for (a, n), (k, v) in zip(plan, contexts, strict=True):
        expected = reference(q[row : row + n], k, v, a)
        torch.testing.assert_close(out[row : row + n].double(), expected, rtol=1e-5, atol=1e-5)
        row += n
    for (a, n), table, (k, _) in zip(plan, tables, contexts, strict=True):  # new keys were cached
        slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(a, a + n)]
        torch.testing.assert_close(kv.k[0][slots], k[a:])
