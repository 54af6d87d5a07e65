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
    """Sequences that share one SDPA call: B sequences with Q new tokens each, L context (padded).
    Decodes form one group (Q = 1); each prefill chunk is a group of its own (B = 1), so no query
    is ever padded."""

    rows: torch.Tensor  # [B * Q] rows of the flattened step, sequence-major
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
        bs, num = kv.block_size, len(lengths)
        ctx = torch.tensor([a + n for a, n in zip(starts, lengths, strict=True)])  # [B]
        width = max((len(t) for t in block_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
        pos = torch.arange(int(ctx.max()) if num else 0)  # [C]
        slots = tables.view(num, width)[:, pos // bs] * bs + pos % bs  # [B, C]
        offsets = torch.tensor([0, *lengths]).cumsum(0).tolist()
        new_pos = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, lengths, strict=True)])
        seq_of_row = torch.repeat_interleave(torch.arange(num), torch.tensor(lengths))  # [T]
        slot_mapping = slots[seq_of_row, new_pos]  # [T]
        groups = []
        for i, n in enumerate(lengths):
            if n > 1:  # a prefill chunk: causal over its own new tokens
                c = int(ctx[i])
                mask = pos[None, :c] <= torch.arange(starts[i], c)[:, None]  # [n, c]
                rows = torch.arange(offsets[i], offsets[i] + n)
                groups.append(AttentionGroup(rows, slots[i : i + 1, :c], mask[None, None]))
        decode = [i for i, n in enumerate(lengths) if n == 1]
        if decode:
            index = torch.tensor(decode)
            c = int(ctx[index].max())
            mask = pos[None, :c] < ctx[index][:, None]  # [Bd, c]
            groups.append(
                AttentionGroup(torch.tensor(offsets)[index], slots[index, :c], mask[:, None, None])
            )
        for g in groups:
            g.rows, g.context_slots, g.mask = (
                g.rows.to(device),
                g.context_slots.to(device),
                g.mask.to(device),
            )
        return cls(kv=kv, slot_mapping=slot_mapping.to(device), groups=groups)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: AttentionBatch
) -> torch.Tensor:
    """q [T, h, D], k/v [T, kvh, D] for the new tokens -> [T, h, D]; writes k/v into the cache."""
    k_cache, v_cache = batch.kv.k[layer], batch.kv.v[layer]
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    groups_per_kv = heads // kv_heads
    out = torch.empty_like(q)
    for g in batch.groups:
        b, _, q_len, _ = g.mask.shape
        # Fold the query heads sharing a KV head into the query axis: no KV repeat needed.
        qg = q[g.rows].view(b, q_len, kv_heads, groups_per_kv, dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(b, kv_heads, groups_per_kv * q_len, dim)  # [B, kvh, g*Q, D]
        kg = k_cache[g.context_slots].transpose(1, 2)  # [B, kvh, L, D]
        vg = v_cache[g.context_slots].transpose(1, 2)
        mask = g.mask.expand(b, groups_per_kv, q_len, -1).reshape(b, 1, groups_per_kv * q_len, -1)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)  # [B, kvh, g*Q, D]
        og = og.view(b, kv_heads, groups_per_kv, q_len, dim).permute(0, 3, 1, 2, 4)
        out[g.rows] = og.reshape(b * q_len, heads, dim)
    return out
