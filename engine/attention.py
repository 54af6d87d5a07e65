"""Attention over a paged KV cache in plain torch (SDPA): the CPU path, also correct on CUDA.

A step's tokens are flattened to [T, ...]. Each sequence contributes a run of new tokens (a prefill
chunk or one decode token) and attends to its whole context, gathered a whole KV block at a time
through its block table (`index_select` of block rows: per-token advanced indexing cost 6x more).
Decodes are batched into one padded SDPA call; prefill chunks run one sequence at a time so a long
chunk never pads the short ones, and a prompt's first chunk skips the cache altogether.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.attention_sinks import sink_group
from engine.family_config import LocalAttention
from engine.kv_cache import KVCache, gather, raw
from engine.linear_state import LinearBatch

logger = logging.getLogger(__name__)


# A folded mask repeats each query's row for every head of its KV group: for MLA (one KV head) and
# a long chunk after a cached prefix that is heads x Q x L (DeepSeek-V3: 2 GB at Q = 2048, L = 4096).
# A bigger one is built, and attended, a slice of queries at a time, and a step keeps at most this
# many elements of folded masks for its later layers.
MAX_FOLDED_MASK = 1 << 24  # elements


@dataclass
class AttentionGroup:
    """Sequences that share one SDPA call: B sequences with Q new tokens each, L context (padded).
    Decodes form one group (Q = 1); each prefill chunk is a group of its own (B = 1), so no query
    is ever padded. A prompt's first chunk attends only to itself: it reads its keys straight from
    the step (causal, `blocks` None) instead of from the cache."""

    rows: slice | torch.Tensor  # [B * Q] rows of the flattened step, sequence-major
    blocks: torch.Tensor | None  # [B * nb] KV blocks of each sequence's context, padded with 0
    mask: torch.Tensor | None  # [B, 1, Q, nb * block_size] additive: 0 where a query may attend
    positions: torch.Tensor | None = None  # [B, Q] of the queries, with blocks (sink_attention)
    # A local layer's part of the context: [B * nw] blocks from each sequence's first block its
    # window reaches, and [B] the position of its first key (the model's window, if any).
    window_blocks: torch.Tensor | None = None
    window_start: torch.Tensor | None = None
    window_mask: torch.Tensor | None = None  # [B, 1, Q, nw * block_size]: `mask`, for the window


def _rows(offsets: list[int], index: list[int], lengths: list[int]) -> slice | torch.Tensor:
    """The step rows of the sequences in `index`: a slice when they are contiguous (the usual case)."""
    rows = [r for i in index for r in range(offsets[i], offsets[i] + lengths[i])]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows)


@dataclass
class AttentionBatch:
    kv: KVCache
    slot_mapping: torch.Tensor  # [T] KV slot each new token is written to
    groups: list[AttentionGroup]
    linear: LinearBatch | None = None  # linear-attention layers' states (Qwen3-Next), if any
    local_slot_mapping: torch.Tensor | None = None  # [T] for local layers with their own pool
    _folded: dict[tuple[int, int, bool], torch.Tensor] = field(default_factory=dict)
    _folded_elements: int = 0  # of the masks kept in _folded, within MAX_FOLDED_MASK

    def folded_mask(
        self, index: int, groups_per_kv: int, lo: int, hi: int, window: bool = False
    ) -> torch.Tensor:
        """Group `index`'s mask (its `window_mask` with `window`) for its queries lo..hi-1 folded
        to [B, 1, g*n, L]: each query row repeated per head of its KV group, broadcast over the KV
        heads (decode masks, Q = 1, are used as they are). Folded masks are kept for the step's
        later layers while the step's total stays within MAX_FOLDED_MASK; past it they are built
        again on each call."""
        group = self.groups[index]
        mask = group.window_mask if window else group.mask
        assert mask is not None
        b, _, q_len, width = mask.shape
        if q_len == 1:
            return mask
        key = (index, groups_per_kv, window)
        if (lo, hi) == (0, q_len) and key in self._folded:
            return self._folded[key]
        folded = mask[:, :, lo:hi].expand(b, groups_per_kv, hi - lo, width)
        folded = folded.reshape(b, 1, groups_per_kv * (hi - lo), width)
        if (lo, hi) == (0, q_len) and self._folded_elements + folded.numel() <= MAX_FOLDED_MASK:
            self._folded[key] = folded
            self._folded_elements += folded.numel()
        return folded

    @classmethod
    def build(
        cls,
        kv: KVCache,
        block_tables: list[list[int]],
        starts: list[int],
        lengths: list[int],
        device: torch.device | str,
        window: LocalAttention | None = None,
        local_tables: list[list[int]] | None = None,
    ) -> AttentionBatch:
        """Sequence i holds `starts[i]` cached tokens and appends `lengths[i]` new ones.
        `window`: the model's local attention, whose layers then gather only the blocks it spans,
        from `local_tables` where they have a pool of their own (scheduler/block_pools.py)."""
        bs = kv.block_size
        offsets = [0, *itertools.accumulate(lengths)]

        def slots(tables: list[list[int]]) -> torch.Tensor:
            return torch.tensor(
                [
                    tables[i][p // bs] * bs + p % bs
                    for i, (a, n) in enumerate(zip(starts, lengths, strict=True))
                    for p in range(a, a + n)
                ],
                device=device,
            )

        groups = []
        for i, n in enumerate(lengths):
            if n > 1 and starts[i] == 0:  # a prompt's first chunk: causal over itself
                groups.append(AttentionGroup(_rows(offsets, [i], lengths), None, None))
            elif n > 1:  # a later chunk: its cached prefix, then causal over its own tokens
                groups.append(
                    cls._cached_group(
                        kv, block_tables, starts, lengths, offsets, [i], window, local_tables
                    )
                )
        decode = [i for i, n in enumerate(lengths) if n == 1]
        if decode:
            groups.append(
                cls._cached_group(
                    kv, block_tables, starts, lengths, offsets, decode, window, local_tables
                )
            )
        for g in groups:
            g.rows = g.rows if isinstance(g.rows, slice) else g.rows.to(device)
            names = ("blocks", "mask", "positions", "window_blocks", "window_start", "window_mask")
            for name in names:
                tensor = getattr(g, name)
                setattr(g, name, None if tensor is None else tensor.to(device))
        local = None if local_tables is None else slots(local_tables)
        return cls(kv=kv, slot_mapping=slots(block_tables), groups=groups, local_slot_mapping=local)

    @staticmethod
    def _cached_group(
        kv: KVCache,
        block_tables: list[list[int]],
        starts: list[int],
        lengths: list[int],
        offsets: list[int],
        index: list[int],
        window: LocalAttention | None = None,
        local_tables: list[list[int]] | None = None,
    ) -> AttentionGroup:
        """Sequences `index` (all with the same number of new tokens) reading their context from
        the cache, whole blocks at a time; with a `window`, also the blocks it reaches (from
        `local_tables` when given)."""
        bs, q_len = kv.block_size, lengths[index[0]]
        ends = torch.tensor([starts[i] + lengths[i] for i in index])  # [B] context lengths
        nb = -(-int(ends.max()) // bs)
        blocks = torch.tensor(
            [block_tables[i][:nb] + [0] * (nb - len(block_tables[i][:nb])) for i in index]
        )
        key_pos = torch.arange(nb * bs)  # [L]
        query_pos = ends[:, None] - q_len + torch.arange(q_len)  # [B, Q]
        allowed = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, Q, L] causal, no padding
        mask = torch.zeros(allowed.shape, dtype=kv.dtype).masked_fill_(~allowed, float("-inf"))
        group = AttentionGroup(
            _rows(offsets, index, lengths), blocks.view(-1), mask[:, None], query_pos
        )
        if window is not None:  # from the block of the first query's earliest key, per sequence
            first = [max(0, window.first_key(starts[i])) // bs for i in index]
            last = [(starts[i] + lengths[i] - 1) // bs for i in index]
            width = max(b - a + 1 for a, b in zip(first, last, strict=True))
            windowed = block_tables if local_tables is None else local_tables
            tables = [windowed[i][a : a + width] for i, a in zip(index, first, strict=True)]
            group.window_blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables]).view(
                -1
            )
            group.window_start = torch.tensor(first) * bs  # [B]
            if not window.chunked:  # sliding layers (gpt-oss's, with sinks) build their own
                return group
            key_pos = group.window_start[:, None] + torch.arange(width * bs)  # [B, Lw]
            seen = (key_pos[:, None, :] <= query_pos[:, :, None]) & (
                key_pos[:, None, :] >= window.first_key(query_pos)[:, :, None]
            )  # [B, Q, Lw]
            group.window_mask = torch.zeros(seen.shape, dtype=kv.dtype).masked_fill_(
                ~seen, float("-inf")
            )[:, None]
        return group


def store_kv(
    k: torch.Tensor, v: torch.Tensor, layer: int, batch: AttentionBatch, local: bool = False
) -> None:
    """Write the step's new keys [T, kvh, D] and values [T, kvh, Dv] into their cache slots (the
    values only where the cache keeps them; a `local` layer's in its own pool, where it has one).
    An FP8 cache takes them already `rounded`."""
    kv, slots = batch.kv, batch.slot_mapping
    if local and batch.local_slot_mapping is not None:
        slots = batch.local_slot_mapping
    raw(kv.k[layer]).index_copy_(0, slots, raw(k.to(kv.cache_dtype)))
    if kv.v:
        raw(kv.v[layer]).index_copy_(0, slots, raw(v.to(kv.cache_dtype)))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    batch: AttentionBatch,
    scale: float | None = None,
    skip: Collection[int] = (),
    sinks: torch.Tensor | None = None,
    window: LocalAttention | None = None,
) -> torch.Tensor:
    """q [T, h, D], k [T, kvh, D], v [T, kvh, Dv] for the new tokens -> [T, h, Dv]; writes k and v
    into the cache (a cache without value tensors reads v as k[..., :Dv]). `scale` is the softmax
    scale, 1/sqrt(D) by default. The rows of the groups whose indices are in `skip` are left unset:
    the caller attends them its own way (MLA, expanded). gpt-oss's `sinks` [h] go through
    engine/attention_sinks.py; a local layer's `window` (Llama 4's chunks) reads only the blocks
    it reaches, under a mask built once a step (a first chunk: causal, chunk by chunk)."""
    bs, dtype = batch.kv.block_size, q.dtype
    k, v = batch.kv.rounded(k), batch.kv.rounded(v)
    store_kv(k, v, layer, batch, local=window is not None)
    k_cache = batch.kv.k[layer]
    heads, kv_heads, key_dim, value_dim = q.shape[1], k.shape[1], k.shape[2], v.shape[2]
    groups_per_kv = heads // kv_heads
    outs: list[torch.Tensor | None] = []
    for index, g in enumerate(batch.groups):
        if index in skip:
            outs.append(None)
            continue
        if sinks is not None or (window is not None and not window.chunked):
            outs.append(sink_group(q, k, v, layer, batch, g, scale, sinks, window))
            continue
        if g.blocks is None:  # causal over the chunk's own keys, GQA handled by SDPA
            qg, kg, vg = (t[g.rows].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, n, D]
            size = qg.shape[2] if window is None else window.size  # Llama 4: chunk by chunk
            parts = [
                F.scaled_dot_product_attention(
                    *(t[:, :, a : a + size] for t in (qg, kg, vg)),
                    is_causal=True,
                    enable_gqa=True,
                    scale=scale,
                )
                for a in range(0, qg.shape[2], size)
            ]
            og = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            outs.append(og[0].transpose(0, 1))  # [n, heads, Dv]
            continue
        # A local layer (no sinks) reads only the blocks its window reaches, under their mask.
        blocks = g.blocks if window is None else g.window_blocks
        mask = g.mask if window is None else g.window_mask
        assert blocks is not None and mask is not None
        b, _, q_len, width = mask.shape
        kg = gather(k_cache, blocks, bs, dtype).view(b, width, kv_heads, key_dim).transpose(1, 2)
        if batch.kv.v:  # [B, kvh, L, Dv]
            vg = gather(batch.kv.v[layer], blocks, bs, dtype)
            vg = vg.view(b, width, kv_heads, value_dim)
            vg = vg.transpose(1, 2)
        else:
            vg = kg[..., :value_dim]
        queries = q[g.rows].view(b, q_len, kv_heads, groups_per_kv, key_dim)
        span = max(1, MAX_FOLDED_MASK // (b * groups_per_kv * width))  # queries per SDPA call
        parts = []
        for lo in range(0, q_len, span):
            hi = min(lo + span, q_len)
            # Fold the query heads sharing a KV head into the query axis: no KV repeat needed.
            qg = queries[:, lo:hi].permute(0, 2, 3, 1, 4)  # [B, kvh, g, n, D]
            qg = qg.reshape(b, kv_heads, groups_per_kv * (hi - lo), key_dim)  # [B, kvh, g*n, D]
            folded = batch.folded_mask(index, groups_per_kv, lo, hi, window is not None)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=folded, scale=scale)
            og = og.view(b, kv_heads, groups_per_kv, hi - lo, value_dim)
            parts.append(og.permute(0, 3, 1, 2, 4))  # [B, n, kvh, g, Dv]
        og = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [B, Q, kvh, g, Dv]
        outs.append(og.reshape(b * q_len, heads, value_dim))  # [B*Q, h, Dv]
    only = outs[0] if len(outs) == 1 else None
    if only is not None and batch.groups[0].rows == slice(0, q.shape[0]):  # all rows, in order
        return only
    out = q.new_empty(q.shape[0], heads, value_dim)  # [T, h, Dv]
    for g, og in zip(batch.groups, outs, strict=True):
        if og is not None:
            out[g.rows] = og
    return out
