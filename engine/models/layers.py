"""Layers shared by every family: RMSNorm, rotary embedding, attention over paged KV, MLPs, the MoE block."""

from __future__ import annotations

import itertools
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBatch, paged_attention
from engine.model_config import ModelConfig
from engine.models.family import Convert, StackedPart
from engine.models.router import Router


class RMSNorm(nn.Module):
    """Normalised in float32, scaled in the model's dtype (as transformers does), by torch's fused
    kernel: one op instead of five, a third of the time at decode sizes. A float32 weight (every
    float32 model's; Qwen3-Next's 1 + w) scales in float32 before the cast, as transformers does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.shape = eps, (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return F.rms_norm(x.float(), self.shape, self.weight, self.eps).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


class PositionTables(NamedTuple):
    """What the step's positions give every attention layer, built once per forward."""

    cos: torch.Tensor  # [T, 1, R] in the model's dtype, or float32 (cfg.rope_float32)
    signed_sin: torch.Tensor  # [T, 1, R]
    nope_scale: torch.Tensor | None  # [T, 1, 1] float32: Llama 4's query temperature, NoPE layers


class Rotary(nn.Module):
    """Neox-style rotary embedding (rotate_half), as every family computes it (Llama 4's and
    DeepSeek's interleaved pairs are permuted into halves at load). Its cos and signed sin are
    [T, 1, R]; R is the rotary dim (the head dim, or GLM-4.5's leading part of it). A scaled
    rotary (YaRN, linear, Llama 3) brings its own frequencies and cos/sin factor. Llama 4's layers
    without rotary scale their queries by 1 + attn_scale * log(1 + floor((p + 1) / floor_scale))
    instead, which grows with the position p past floor_scale."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.rope_inv_freq:
            inv_freq = torch.tensor(cfg.rope_inv_freq, dtype=torch.float32)
        else:
            dim = cfg.rotary_dim
            exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            inv_freq = 1.0 / (cfg.rope_theta**exponents)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [R/2]
        self.factor = cfg.rope_attention_factor
        self.temperature = cfg.nope_temperature
        self.float32 = cfg.rope_float32

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> PositionTables:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        sin = freqs.sin()
        cos = torch.cat((freqs, freqs), dim=-1).cos()  # [T, R]
        signed_sin = torch.cat((-sin, sin), dim=-1)  # [T, R]: rotate_half's signs folded in
        if self.factor != 1.0:
            cos, signed_sin = cos * self.factor, signed_sin * self.factor
        nope_scale = None
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            steps = torch.floor((positions.float() + 1.0) / floor_scale)  # [T]
            nope_scale = (torch.log1p(steps) * attn_scale + 1.0)[:, None, None]
        dtype = torch.float32 if self.float32 else dtype
        return PositionTables(
            cos[:, None, :].to(dtype), signed_sin[:, None, :].to(dtype), nope_scale
        )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/signed_sin: [T, 1, R], R <= D: the leading R dims turn, the rest pass,
    in the tables' dtype (float32 where the family turns in float32), returned in x's.
    rotate_half(x) * sin is x with its halves swapped (a roll by R/2) times sin with its first half
    negated: the same products, fewer ops."""
    dim = cos.shape[-1]
    turned = (x if dim == x.shape[-1] else x[..., :dim]).to(cos.dtype)
    rotated = torch.addcmul(turned * cos, turned.roll(dim // 2, dims=-1), signed_sin).to(x.dtype)
    return rotated if dim == x.shape[-1] else torch.cat((rotated, x[..., dim:]), dim=-1)


class Attention(nn.Module):
    """q, k and v come from one fused projection, `qkv_proj`, whose rows the loader fills from the
    hub's q_proj, k_proj and v_proj (`HUB_PARTS`): one GEMM per layer instead of three."""

    HUB_PARTS = ("q_proj", "k_proj", "v_proj")  # in qkv_proj's row order

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # Qwen3-Next's q_proj also yields a gate per output channel: its rows follow the queries'
        self.gated = cfg.attention_output_gate
        q_rows = 2 * q_dim if self.gated else q_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_rows + 2 * kv_dim, bias=cfg.qkv_bias)
        self.qkv_dims = [q_rows, kv_dim, kv_dim]
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.sinks = nn.Parameter(torch.zeros(cfg.num_heads)) if cfg.attention_sinks else None
        self.window = cfg.local_attention if layer in cfg.local_layers else None
        self.rotary = layer not in cfg.nope_layers  # Llama 4's NoPE layers scale q instead
        self.interleaved = cfg.rope_interleaved and self.rotary
        self.clip_qkv = cfg.clip_qkv
        # Llama 4 L2-normalises q and k (no weight) on its rotary layers only
        self.qk_norm = "none" if cfg.qk_norm == "l2" and not self.rotary else cfg.qk_norm
        self.eps = cfg.rms_norm_eps
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: PositionTables, batch: AttentionBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (h + 2 kvh) * D]
        h, kvh, clip = self.num_heads, self.num_kv_heads, self.clip_qkv
        gate: torch.Tensor | None = None  # Qwen3-Next's output gate [T, h*D]
        if self.qk_norm == "none":  # rotate q and k in one go: they are adjacent heads of qkv
            if clip is not None:
                qkv = qkv.clamp(-clip, clip)
            heads = qkv.view(-1, h + 2 * kvh, self.head_dim)
            qk = heads[:, : h + kvh]  # [T, h + kvh, D]
            if self.rotary:
                qk = apply_rotary(qk, rope.cos, rope.signed_sin)
            q, k, v = qk[:, :h], qk[:, h:], heads[:, h + kvh :]
        else:
            q, k, v = qkv.split(self.qkv_dims, dim=-1)  # [T, h*D], [T, kvh*D] x2
            if self.gated:
                q, gate = q.chunk(2, dim=-1)  # [T, h*D] each
            if self.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            if clip is not None:  # OLMoE clips after its q/k norms
                q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
            q = q.reshape(-1, h, self.head_dim)  # [T, h, D]
            k = k.reshape(-1, kvh, self.head_dim)  # [T, kvh, D]
            v = v.reshape(-1, kvh, self.head_dim)
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rotary:
                q, k = (apply_rotary(t, rope.cos, rope.signed_sin) for t in (q, k))
            if self.qk_norm == "l2":  # after the rotary, as Llama 4 does
                q, k = (
                    F.rms_norm(t.float(), (self.head_dim,), eps=self.eps).to(t.dtype)
                    for t in (q, k)
                )
        if not self.rotary and rope.nope_scale is not None:
            q = (q * rope.nope_scale).to(q.dtype)
        out = paged_attention(q, k, v, self.layer, batch, sinks=self.sinks, window=self.window)
        out = out.reshape(x.shape[0], -1)  # [T, h*D]
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)

    def stacked_parts(self) -> list[StackedPart]:
        """The hub's q/k/v projections and their rows in `qkv_proj`. A gated q_proj interleaves
        each head's query and gate rows on the hub; here all queries come first. Llama 4 pairs
        each head's rotary dims as (x0, x1), (x2, x3), ...; here as halves (x0, x2, ..., x1, x3,
        ...), permuted alike in q and k so that their dot products do not change."""
        offsets = [0, *itertools.accumulate(self.qkv_dims)]
        rows = [slice(a, b) for a, b in itertools.pairwise(offsets)]
        h, d = self.num_heads, self.head_dim

        def queries_then_gates(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(0, (h, 2, d)).transpose(0, 1).flatten(0, 2)

        def halves(t: torch.Tensor) -> torch.Tensor:  # [heads * D, ...], pairs -> halves
            return t.unflatten(0, (-1, d // 2, 2)).transpose(1, 2).flatten(0, 2)

        converts: list[Convert | None] = [None, None, None]
        if self.gated:
            converts[0] = queries_then_gates
        elif self.interleaved:
            converts[:2] = [halves, halves]
        return [
            (part, "qkv_proj", r, c)
            for part, r, c in zip(self.HUB_PARTS, rows, converts, strict=True)
        ]


class MLP(nn.Module):
    """A dense SwiGLU MLP: Qwen2-MoE's shared expert and dense layers."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(Protocol):
    """How an MoE block runs its routed experts; all-resident or offloaded, the model does not care."""

    def __call__(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        router_logits: torch.Tensor,
    ) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, k] expert ids, topk_weights [T, k], router_logits [T, E]
        -> [T, H]. The logits are there for opt-in cache-aware routing."""
        ...


class RoutingObserver(Protocol):
    """Sees each MoE layer's routing before its experts run: the moment to prefetch or record traces."""

    def on_route(
        self,
        layer: int,
        residual: torch.Tensor,
        router_logits: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> None:
        """residual [T, H] (the MoE input before its norm), router_logits [T, E], topk_ids [T, k]."""
        ...


class MoEBlock(nn.Module):
    """Router + routed experts (+ shared experts: Qwen2-MoE's one behind a sigmoid gate, or
    DeepSeek's and Llama 4's ungated ones, under the hub's name `shared_attr`)."""

    def __init__(self, cfg: ModelConfig, layer: int, shared_attr: str = "shared_experts") -> None:
        super().__init__()
        self.layer = layer
        self.gate = Router(cfg.router, cfg.hidden_size, cfg.num_experts)
        self.weights_on_input = cfg.router_weights_on_input
        self.shared_attr: str | None = None  # the shared experts' module name on the hub
        if cfg.shared_expert_intermediate_size:
            self.shared_attr = shared_attr
            setattr(self, shared_attr, MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size))
        self.shared_gated = cfg.shared_expert_gated
        if self.shared_gated:
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        experts: RoutedExperts,
        residual: torch.Tensor,
        observer: RoutingObserver | None,
    ) -> torch.Tensor:
        logits, weights, ids = self.gate(x)
        if observer is not None:
            observer.on_route(self.layer, residual, logits, ids)
        if self.weights_on_input:  # Llama 4: each expert gets its weight times the token
            tokens, k = ids.shape
            scaled = (x[:, None, :] * weights[:, :, None]).view(tokens * k, -1)  # [T*k, H]
            ones = weights.new_ones(tokens * k, 1)
            per_k = logits if k == 1 else logits.repeat_interleave(k, dim=0)  # [T*k, E]
            out = experts(self.layer, scaled, ids.view(-1, 1), ones, per_k)  # [T*k, H]
            out = out.view(tokens, k, -1).sum(dim=1)  # [T, H]
        else:
            out = experts(self.layer, x, ids, weights, logits)  # [T, H]
        if self.shared_attr is None:
            return out
        shared = getattr(self, self.shared_attr)(x)  # [T, H]
        if self.shared_gated:  # Qwen2-MoE gates it per token
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out + shared
