"""DeepSeek's multi-head latent attention (MLA), run "absorbed" over a cache of latents.

Each token caches one vector per layer: its normalised KV latent [kv_lora_rank] and its rotary key
[qk_rope_head_dim], shared by all heads (DeepSeek-V2-Lite: 576 numbers instead of 16 heads x 320).
kv_b_proj's key half is folded into the query and its value half applied after attention, so
attention runs as multi-query attention straight over the cached latents, never expanding them:

    score = q_nope . (W_uk c) + q_rope . k_rope = (W_uk^T q_nope) . c + q_rope . k_rope
    out   = sum_t p_t W_uv c_t = W_uv (sum_t p_t c_t)

A prefill chunk attends the classic way instead, keys and values up-projected per head (vLLM does
the same): 192 + 128 numbers a head and pair of tokens instead of 576 + 512 at V2-Lite's shape, for
the price of up-projecting its context once. A prompt's first chunk up-projects only its own
tokens; a later chunk (after a cached prefix, or a long prompt's next piece) reads its context's
latents from the cache, and is expanded only when it has enough queries to pay for that.

Rotary pairs are interleaved on the hub (x0, x1), (x2, x3), ...; `deinterleave_rope` permutes the
projection rows once at load so the shared half-split rotary applies (q and k get the same
permutation, so every score is unchanged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import (
    MAX_FOLDED_MASK,
    AttentionBatch,
    AttentionGroup,
    paged_attention,
    store_kv,
)
from engine.kv_cache import gather
from engine.model_config import ModelConfig
from engine.models.layers import PositionTables, RMSNorm, apply_rotary

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a/kv_a norms keep their default eps, not rms_norm_eps
# Up-projected keys and values one chunk may hold (elements): DeepSeek-V3's 128 heads take 57344 a
# context token, so its chunks expand up to ~1170 tokens of context, V2-Lite's up to ~9360.
MAX_EXPANDED_KV = 1 << 26


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        mla = cfg.mla
        assert mla is not None
        self.layer, self.mla, self.num_heads = layer, mla, cfg.num_heads
        self.scale = cfg.attention_scale
        q_out = cfg.num_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, mla.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=cfg.qkv_bias
        )
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            mla.kv_lora_rank, cfg.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(cfg.num_heads * mla.v_head_dim, cfg.hidden_size, bias=cfg.qkv_bias)
        # Multiply-adds per head: expanding costs lora x (nope + v) per context token and saves
        # `saved` per (query, key) pair, so a later chunk pays from this many queries on.
        lora, nope, v = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.v_head_dim
        saved = 2 * lora - nope - v  # absorbed (lora + r) + lora, expanded (nope + r) + v
        self.expand_min_queries = math.ceil(lora * (nope + v) / saved) if saved > 0 else math.inf

    def forward(self, x: torch.Tensor, rope: PositionTables, batch: AttentionBatch) -> torch.Tensor:
        mla, h, tokens = self.mla, self.num_heads, x.shape[0]
        nope, lora = mla.qk_nope_head_dim, mla.kv_lora_rank
        if mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(tokens, h, mla.qk_head_dim).split([nope, mla.qk_rope_head_dim], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([lora, mla.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent)  # [T, lora]
        q_rope = apply_rotary(q_rope, rope.cos, rope.signed_sin)  # [T, h, r]
        k_rope = apply_rotary(k_rope[:, None, :], rope.cos, rope.signed_sin)  # [T, 1, r]
        key = torch.cat([latent[:, None, :], k_rope], dim=-1)  # [T, 1, lora + r]
        key = batch.kv.rounded(key)  # as an FP8 cache holds it, for every path alike
        latent, k_rope = key[:, 0, :lora], key[:, :, lora:]
        expand = [i for i, g in enumerate(batch.groups) if self._expands(g)]
        if len(expand) == len(batch.groups):  # a prefill-only step: no query is absorbed
            store_kv(key, key[..., :0], self.layer, batch)
            out = x.new_empty(tokens, h, mla.v_head_dim)
        else:
            w_kv = self.kv_b_proj.weight.view(h, nope + mla.v_head_dim, lora)
            w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]  # [h, nope, lora], [h, v, lora]
            q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, h, lora]
            query = torch.cat([q_latent, q_rope], dim=-1)  # [T, h, lora + r]
            out = paged_attention(
                query, key, key[..., :lora], self.layer, batch, self.scale, skip=expand
            )  # [T, h, lora]; the expanded groups' rows unset
            out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, h, v]
        for i in expand:
            g = batch.groups[i]
            rows = g.rows
            if g.blocks is None:  # a prompt's first chunk: causal over its own tokens
                context, rotary = latent[rows], k_rope[rows]
            else:  # a later chunk: its context's latents and rotary keys, new ones included
                cached = gather(batch.kv.k[self.layer], g.blocks, batch.kv.block_size, x.dtype)
                cached = cached[:, 0]
                context, rotary = cached[:, :lora], cached[:, None, lora:]  # [L, lora], [L, 1, r]
            out[rows] = self._expanded(q_nope[rows], q_rope[rows], context, rotary, g.mask)
        return self.o_proj(out.reshape(tokens, h * mla.v_head_dim))

    def _expands(self, group: AttentionGroup) -> bool:
        """Whether a group attends expanded: a first chunk, or a later one with enough queries
        (decodes never: one query reads the whole context), if its context's up-projected keys
        and values fit MAX_EXPANDED_KV."""
        mla = self.mla
        per_token = self.num_heads * (
            2 * mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim
        )
        if group.blocks is None:
            rows = group.rows
            length = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
            return length * per_token <= MAX_EXPANDED_KV
        assert group.mask is not None
        batch, _, queries, length = group.mask.shape
        return (
            batch == 1
            and queries >= self.expand_min_queries
            and length * per_token <= MAX_EXPANDED_KV
        )

    def _expanded(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of n queries over L context tokens with keys and values up-projected per
        head, about 2x faster than absorbed at V2-Lite's shape (benchmarks/mla_prefill.py).
        q_nope [n, h, nope], q_rope [n, h, r], latent [L, lora], k_rope [L, 1, r] and an additive
        mask [1, 1, n, L], or None for causal over the queries' own tokens (L = n) -> [n, h, v].
        With a mask, queries go a slice at a time so each call's scores fit MAX_FOLDED_MASK."""
        mla, h, length = self.mla, self.num_heads, latent.shape[0]
        w_kv = self.kv_b_proj.weight.view(h, mla.qk_nope_head_dim + mla.v_head_dim, -1)
        kv = torch.matmul(latent, w_kv.transpose(1, 2))  # [h, L, nope + v]
        k_nope, values = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        keys = torch.cat([k_nope, k_rope.transpose(0, 1).expand(h, length, -1)], dim=-1)
        queries = torch.cat([q_nope, q_rope], dim=-1).transpose(0, 1)  # [h, n, D]
        if mask is None:
            out = F.scaled_dot_product_attention(
                queries[None], keys[None], values[None], is_causal=True, scale=self.scale
            )  # [1, h, n, v]
            return out[0].transpose(0, 1)
        span = max(1, MAX_FOLDED_MASK // (h * length))
        parts = [
            F.scaled_dot_product_attention(
                queries[None, :, lo : lo + span],
                keys[None],
                values[None],
                mask[..., lo : lo + span, :],
                scale=self.scale,
            )[0]  # [h, span, v]
            for lo in range(0, queries.shape[1], span)
        ]
        return torch.cat(parts, dim=1).transpose(0, 1)

    @torch.no_grad()
    def deinterleave_rope(self) -> None:
        """Reorder the rotary rows of the q and kv_a projections from (x0, x1), (x2, x3), ... to
        (x0, x2, ..., x1, x3, ...)."""
        mla = self.mla
        r = mla.qk_rope_head_dim
        order = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])  # [r]
        q = self.q_proj if mla.q_lora_rank is None else self.q_b_proj
        rows = q.weight.view(self.num_heads, mla.qk_head_dim, -1)[:, mla.qk_nope_head_dim :]
        rows.copy_(rows[:, order.to(rows.device)].clone())
        kv_a = self.kv_a_proj_with_mqa
        for param in (kv_a.weight, kv_a.bias):
            if param is not None:
                tail = param[mla.kv_lora_rank :]
                tail.copy_(tail[order.to(tail.device)].clone())
