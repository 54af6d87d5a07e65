"""engine/attention.py against plain causal attention over each sequence's full context: one step
mixing decodes, a prompt's first chunk and a later chunk, in an order that makes the decode rows
non-contiguous, with blocks scattered over the cache and grouped query heads; and the same step over
an MLA-style cache (one head whose leading channels are the values, a custom softmax scale)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import attention, attention_sinks
from engine.attention import AttentionBatch, paged_attention
from engine.family_config import LocalAttention
from engine.kv_cache import KVCache

HEADS, BLOCK = 6, 4


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """q [n, h, D] for positions start..start+n-1; k [start+n, kvh, D] and v [start+n, kvh, Dv]
    the whole context."""
    groups = HEADS // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)  # [C, h, D]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale  # [h, n, C]
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(start, start + q.shape[0])[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), v.double())  # [n, h, D]


@pytest.mark.parametrize(
    "cache_dtype", [None, torch.float8_e4m3fn, torch.float8_e5m2], ids=["float32", "e4m3", "e5m2"]
)
@pytest.mark.parametrize(
    "mask_budget", [None, 40, 80], ids=["whole-masks", "one-query-slices", "uneven-slices"]
)
@pytest.mark.parametrize(
    ("kv_heads", "dim", "value_dim", "scale"),
    [(2, 8, 8, None), (1, 12, 8, 0.2)],  # grouped-query; MLA: values are the keys' first 8
    ids=["gqa", "latent"],
)
def test_mixed_step_matches_full_attention(
    kv_heads: int,
    dim: int,
    value_dim: int,
    scale: float | None,
    mask_budget: int | None,
    cache_dtype: torch.dtype | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a tiny mask budget the later chunk's queries attend a slice (of one query) at a time.
    With an FP8 cache every query, new or cached, sees the keys and values rounded to FP8."""
    if mask_budget is not None:
        monkeypatch.setattr(attention, "MAX_FOLDED_MASK", mask_budget)
    torch.manual_seed(0)
    latent = value_dim < dim
    geometry = (kv_heads, dim, 0 if latent else value_dim)
    kv = KVCache.allocate(1, 64, BLOCK, geometry, torch.float32, "cpu", cache_dtype)
    assert not kv.v if latent else kv.v
    # (cached tokens, new tokens) per sequence: decode, first chunk, decode, later chunk, decode
    plan = [(9, 1), (0, 7), (3, 1), (6, 5), (13, 1)]
    blocks = iter(torch.randperm(64).tolist())  # scattered, never in order
    tables = [[next(blocks) for _ in range(-(-(a + n) // BLOCK))] for a, n in plan]
    keys = [torch.randn(a + n, kv_heads, dim) for a, n in plan]
    contexts = [
        (k, k[..., :value_dim] if latent else torch.randn(a + n, kv_heads, value_dim))
        for (a, n), k in zip(plan, keys, strict=True)
    ]
    for (a, _), table, (k, v) in zip(plan, tables, contexts, strict=True):  # cache what is cached
        slots = torch.tensor(
            [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(a)], dtype=torch.long
        )
        kv.k[0][slots] = k[:a].to(kv.cache_dtype)
        if not latent:
            kv.v[0][slots] = v[:a].to(kv.cache_dtype)
    q = torch.randn(sum(n for _, n in plan), HEADS, dim)  # [T, h, D]
    new_k = torch.cat([k[a:] for (a, _), (k, _) in zip(plan, contexts, strict=True)])
    new_v = torch.cat([v[a:] for (a, _), (_, v) in zip(plan, contexts, strict=True)])
    batch = AttentionBatch.build(kv, tables, [a for a, _ in plan], [n for _, n in plan], "cpu")
    assert any(g.blocks is None for g in batch.groups)  # the first chunk reads no cache
    assert any(isinstance(g.rows, torch.Tensor) for g in batch.groups)  # decodes are split up
    out = paged_attention(q, new_k, new_v, 0, batch, scale)
    assert batch._folded_elements <= attention.MAX_FOLDED_MASK  # what the step keeps
    assert out.shape == (q.shape[0], HEADS, value_dim)
    row = 0
    for (a, n), (k, v) in zip(plan, contexts, strict=True):
        k, v = kv.rounded(k), kv.rounded(v)
        expected = reference(q[row : row + n], k, v, a, scale or dim**-0.5)
        torch.testing.assert_close(out[row : row + n].double(), expected, rtol=1e-5, atol=1e-5)
        row += n
    for (a, n), table, (k, _) in zip(plan, tables, contexts, strict=True):  # new keys were cached
        slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(a, a + n)]
        torch.testing.assert_close(kv.k[0][slots].float(), kv.rounded(k[a:]))


def test_an_fp8_cache_saturates_instead_of_overflowing() -> None:
    kv = KVCache.allocate(1, 4, BLOCK, (1, 2, 2), torch.float32, "cpu", torch.float8_e4m3fn)
    rounded = kv.rounded(torch.tensor([[[1e4, -1e4]]]))
    assert rounded.tolist() == [[[448.0, -448.0]]] and rounded.dtype == torch.float32
    same = KVCache.allocate(1, 4, BLOCK, (1, 2, 2), torch.float32, "cpu")
    x = torch.randn(3, 1, 2)
    assert same.rounded(x) is x


def written_out(q, k, v, query_pos, scale, sinks, window, key_start):  # noqa: ANN001, ANN201
    """The attention of `sink_attention` spelled out per sequence and head, in float64."""
    b, q_len, heads, _ = q.shape
    groups = heads // k.shape[2]
    out = torch.zeros(b, q_len, heads, v.shape[3], dtype=torch.float64)
    for s in range(b):
        key_pos = torch.arange(k.shape[1]) + key_start[s]
        for h in range(heads):
            scores = q[s, :, h].double() @ k[s, :, h // groups].double().T * scale  # [Q, L]
            seen = key_pos[None] <= query_pos[s, :, None]
            if window is not None and window.chunked:  # same chunk as the query
                seen &= key_pos[None] // window.size == query_pos[s, :, None] // window.size
            elif window is not None:  # the last `size` positions
                seen &= key_pos[None] > query_pos[s, :, None] - window.size
            scores = scores.masked_fill(~seen, float("-inf"))
            sink = torch.full((q_len, 1), float(sinks[h]), dtype=torch.float64)
            probs = torch.cat((scores, sink), dim=1).softmax(dim=1)[:, :-1]
            out[s, :, h] = probs @ v[s, :, h // groups].double()
    return out


@pytest.mark.parametrize(
    "window",
    [None, LocalAttention(5), LocalAttention(4, chunked=True)],
    ids=["causal", "sliding", "chunked"],
)
@pytest.mark.parametrize("max_mask", [1 << 24, 300], ids=["whole", "sliced"])
def test_sink_attention_matches_the_written_out_softmax(
    window: LocalAttention | None, max_mask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sequences whose keys start at different positions (a window's blocks), two query
    heads per KV head, each head's sink; "sliced" runs one sequence and one query at a time.
    Chunks of 4: the queries at 7 and 8 see different keys."""
    monkeypatch.setattr(attention_sinks, "MAX_MASK", max_mask)
    gen = torch.Generator().manual_seed(0)
    b, q_len, heads, kv_heads, dim, width = 3, 4, 4, 2, 8, 12
    q = torch.randn(b, q_len, heads, dim, generator=gen)
    k = torch.randn(b, width, kv_heads, dim, generator=gen)
    v = torch.randn(b, width, kv_heads, 6, generator=gen)
    key_start = torch.tensor([0, 16, 32])
    query_pos = key_start[:, None] + torch.tensor([[7, 8, 9, 10], [8, 9, 10, 11], [2, 3, 4, 5]])
    sinks = torch.randn(heads, generator=gen) * 2
    ours = attention_sinks.sink_attention(q, k, v, query_pos, 0.3, sinks, window, key_start)
    ref = written_out(q, k, v, query_pos, 0.3, sinks, window, key_start)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
