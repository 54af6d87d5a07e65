"""Attention over a paged KV cache in plain torch (SDPA): the CPU path, also correct on CUDA.

A step's tokens are flattened to [T, ...]. Each sequence contributes a run of new tokens (a prefill
chunk or one decode token) and attends to its whole context, read from KV blocks through its block
table. Decodes are batched into one padded SDPA call; prefill chunks run one sequence at a time so a
long chunk never pads the short ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Paged KV storage: one [num_blocks * block_size, kv_heads, head_dim] tensor per layer."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (num_blocks * block_size, kv_heads, head_dim)
        make = lambda: [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # noqa: E731
        return cls(k=make(), v=make(), block_size=block_size)

    @property
    def bytes_per_block(self) -> int:
        t = self.k[0]
        return 2 * len(self.k) * self.block_size * t.shape[1] * t.shape[2] * t.element_size()


@dataclass
class AttentionGroup:
    """Sequences that share one SDPA call: B sequences, Q new tokens each (padded), L context (padded)."""

    token_index: torch.Tensor  # [B, Q] rows of the flattened step; -1 = padding
    context_slots: torch.Tensor  # [B, L] KV slots of each sequence's context, padded with 0
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend to a key


@dataclass
class AttentionBatch:
    kv: KVCache
    slot_mapping: torch.Tensor  # [T] KV slot each new token is written to
    groups: list[AttentionGroup]

    @classmethod
    def build(
        cls,
        kv: KVCache,
        block_tables: list[list[int]],
        starts: list[int],
        lengths: list[int],
        device: torch.device | str,
    ) -> AttentionBatch:
        """Sequence i holds `starts[i]` cached tokens and appends `lengths[i]` new ones."""
        bs = kv.block_size
        slots_per_seq: list[torch.Tensor] = []
        for table, start, length in zip(block_tables, starts, lengths, strict=True):
            pos = torch.arange(start + length)
            table_t = torch.tensor(table, dtype=torch.long)
            slots_per_seq.append(table_t[pos // bs] * bs + pos % bs)  # [C]
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        slot_mapping = (
            torch.cat([s[start:] for s, start in zip(slots_per_seq, starts, strict=True)])
            if slots_per_seq
            else torch.empty(0, dtype=torch.long)
        )
        decode = [i for i, n in enumerate(lengths) if n == 1]
        prefill = [i for i, n in enumerate(lengths) if n > 1]
        groups = [_group([i], slots_per_seq, starts, lengths, offsets) for i in prefill]
        if decode:
            groups.append(_group(decode, slots_per_seq, starts, lengths, offsets))
        for g in groups:
            g.token_index, g.context_slots, g.mask = (
                g.token_index.to(device),
                g.context_slots.to(device),
                g.mask.to(device),
            )
        return cls(kv=kv, slot_mapping=slot_mapping.to(device), groups=groups)


def _group(
    members: list[int],
    slots: list[torch.Tensor],
    starts: list[int],
    lengths: list[int],
    offsets: list[int],
) -> AttentionGroup:
    q_max = max(lengths[i] for i in members)
    ctx_max = max(starts[i] + lengths[i] for i in members)
    token_index = torch.full((len(members), q_max), -1, dtype=torch.long)
    context_slots = torch.zeros((len(members), ctx_max), dtype=torch.long)
    mask = torch.zeros((len(members), 1, q_max, ctx_max), dtype=torch.bool)
    key_pos = torch.arange(ctx_max)
    for row, i in enumerate(members):
        n, ctx = lengths[i], starts[i] + lengths[i]
        token_index[row, :n] = torch.arange(offsets[i], offsets[i] + n)
        context_slots[row, :ctx] = slots[i]
        query_pos = torch.arange(starts[i], ctx)  # absolute positions of the new tokens
        mask[row, 0, :n] = key_pos[None, :] <= query_pos[:, None]
    return AttentionGroup(token_index, context_slots, mask)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: AttentionBatch
) -> torch.Tensor:
    """q [T, h, D], k/v [T, kvh, D] for the new tokens -> [T, h, D]; writes k/v into the cache."""
    k_cache, v_cache = batch.kv.k[layer], batch.kv.v[layer]
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    num_tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups_per_kv = heads // kv_heads
    out = torch.empty_like(q)
    for g in batch.groups:
        b, q_len = g.token_index.shape
        valid = g.token_index >= 0
        qg = q.new_zeros(b, q_len, heads, dim)
        qg[valid] = q[g.token_index[valid]]
        # Fold the query heads sharing a KV head into the query axis: no KV repeat needed.
        qg = qg.view(b, q_len, kv_heads, groups_per_kv, dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(b, kv_heads, groups_per_kv * q_len, dim)  # [B, kvh, g*Q, D]
        kg = k_cache[g.context_slots].transpose(1, 2)  # [B, kvh, L, D]
        vg = v_cache[g.context_slots].transpose(1, 2)
        mask = g.mask.expand(b, groups_per_kv, q_len, -1).reshape(b, 1, groups_per_kv * q_len, -1)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)  # [B, kvh, g*Q, D]
        og = og.view(b, kv_heads, groups_per_kv, q_len, dim).permute(0, 3, 1, 2, 4)
        out[g.token_index[valid]] = og.reshape(b, q_len, heads, dim)[valid]
    return out
