"""Gated DeltaNet, the linear attention of Qwen3-Next and Qwen3.5: a causal depthwise convolution
over q, k and v, then the gated delta rule, whose state (per value head a [key dim, value dim]
matrix) a sequence carries from step to step (engine/linear_state.py), then an RMSNorm gated by
z. The delta rule itself is transformers': a chunked form for prefill chunks, a recurrent one for
decodes, batched. Where flash-linear-attention is installed transformers hands it to FLA's Triton
kernels, which take half-precision CUDA tensors only; anything else runs transformers' torch path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from engine.attention import AttentionBatch
from engine.model_config import ModelConfig
from engine.models.family import StackedPart

# transformers' torch reference, under the wrapper that may dispatch to FLA
TORCH_CHUNK = getattr(torch_chunk_gated_delta_rule, "__wrapped__", torch_chunk_gated_delta_rule)
TORCH_RECURRENT = getattr(
    torch_recurrent_gated_delta_rule, "__wrapped__", torch_recurrent_gated_delta_rule
)


def conv_step(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A decode's causal depthwise convolution: window [B, C, K] (the cached inputs, then the new
    one) times weight [C, K], summed in float32 and rounded once, then silu -> [B, C]. As F.conv1d
    and transformers' causal_conv1d_update round: a half-precision product rounded before the sum
    put Qwen3-Next's decoded logits ~5% further from float32 than transformers' own bfloat16."""
    return F.silu((window.float() * weight).sum(-1).to(window.dtype))


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head, then times silu(z) (in float32, as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.shape = eps, (dim,)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        normed = self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)
        return (normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """`in_proj` is one GEMM for q, k, v (the convolution's channels), z, b and a, filled by the
    loader from the hub's projections (`stacked_parts`)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        la = cfg.linear_attention
        assert la is not None
        self.layer, self.la = layer, la
        self.split = [la.conv_dim, la.value_dim, la.num_value_heads, la.num_value_heads]
        self.in_proj = nn.Linear(cfg.hidden_size, sum(self.split), bias=False)
        self.conv1d = nn.Conv1d(
            la.conv_dim, la.conv_dim, la.conv_kernel, groups=la.conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.ones(la.num_value_heads))
        self.A_log = nn.Parameter(torch.zeros(la.num_value_heads))
        self.norm = GatedRMSNorm(la.value_head_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(la.value_dim, cfg.hidden_size, bias=False)

    def stacked_parts(self) -> list[StackedPart]:
        """The hub's input projections and where their rows go in `in_proj` (q, k, v, z, b, a)."""
        la = self.la
        z_start, b_start = la.conv_dim, la.conv_dim + la.value_dim
        a_start, end = b_start + la.num_value_heads, sum(self.split)
        if la.hub_layout == "split":  # Qwen3.5
            return [
                ("in_proj_qkv", "in_proj", slice(0, z_start), None),
                ("in_proj_z", "in_proj", slice(z_start, b_start), None),
                ("in_proj_b", "in_proj", slice(b_start, a_start), None),
                ("in_proj_a", "in_proj", slice(a_start, end), None),
            ]
        return [  # Qwen3-Next: rows grouped by key head
            ("in_proj_qkvz", "in_proj", slice(0, b_start), self._ungroup_qkvz),
            ("in_proj_ba", "in_proj", slice(b_start, end), self._ungroup_ba),
        ]

    def _ungroup_qkvz(self, t: torch.Tensor) -> torch.Tensor:
        """Qwen3-Next's in_proj_qkvz rows, per key head (q, k, its value heads' v, their z) ->
        all q, all k, all v, all z."""
        la = self.la
        per_key = la.value_dim // la.num_key_heads
        q, k, v, z = t.view(la.num_key_heads, -1, t.shape[-1]).split(
            [la.key_head_dim, la.key_head_dim, per_key, per_key], dim=1
        )
        return torch.cat([p.reshape(-1, t.shape[-1]) for p in (q, k, v, z)])

    def _ungroup_ba(self, t: torch.Tensor) -> torch.Tensor:
        """in_proj_ba rows, per key head (its value heads' b, then their a) -> all b, all a."""
        b, a = t.view(self.la.num_key_heads, 2, -1, t.shape[-1]).unbind(1)
        return torch.cat((b.reshape(-1, t.shape[-1]), a.reshape(-1, t.shape[-1])))

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """x [T, H] -> [T, H]; reads and advances each sequence's state."""
        la, lin = self.la, batch.linear
        assert lin is not None
        mixed, z, b, a = self.in_proj(x).split(self.split, dim=-1)  # [T, C], [T, Hv*Dv], [T, Hv] x2
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [T, Hv] log decay
        weight = self.conv1d.weight[:, 0]  # [C, K]
        fla = x.is_cuda and x.dtype != torch.float32  # else FLA, if installed, would refuse
        chunked = torch_chunk_gated_delta_rule if fla else TORCH_CHUNK
        recurrent = torch_recurrent_gated_delta_rule if fla else TORCH_RECURRENT
        conv_state, state = lin.states.conv[self.layer], lin.states.recurrent[self.layer]
        out = x.new_empty(x.shape[0], la.num_value_heads, la.value_head_dim)  # [T, Hv, Dv]
        if lin.decode_rows is not None:
            rows, slots = lin.decode_rows, lin.decode_slots
            window = torch.cat((conv_state[slots], mixed[rows, :, None]), dim=-1)  # [B, C, K]
            conv_state[slots] = window[..., 1:]
            conved = conv_step(window, weight)  # [B, C]
            q, k, v = self._heads(conved[:, None])  # [B, 1, heads, D]
            core, state[slots] = recurrent(
                q,
                k,
                v,
                g=g[rows, None],
                beta=beta[rows, None],
                initial_state=state[slots],
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )
            out[rows] = core[:, 0]
        for rows, slot in lin.chunks:
            window = torch.cat((conv_state[slot], mixed[rows].T), dim=-1)  # [C, K-1+n]
            conv_state[slot] = window[:, window.shape[-1] - conv_state.shape[-1] :]
            conved = F.silu(F.conv1d(window[None], self.conv1d.weight, groups=la.conv_dim))
            q, k, v = self._heads(conved[0].T[None])  # [1, n, heads, D]
            core, final = chunked(
                q,
                k,
                v,
                g=g[rows][None],
                beta=beta[rows][None],
                initial_state=state[slot : slot + 1],
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )
            state[slot] = final[0]
            out[rows] = core[0]
        gated = self.norm(out.view(-1, la.value_head_dim), z.reshape(-1, la.value_head_dim))
        return self.out_proj(gated.view(x.shape[0], la.value_dim))

    def _heads(self, conved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, n, C] convolved channels -> q, k [B, n, Hk, Dk] and v [B, n, Hv, Dv]."""
        la = self.la
        key_dim = la.num_key_heads * la.key_head_dim
        q, k, v = conved.split([key_dim, key_dim, la.value_dim], dim=-1)
        return (
            q.unflatten(-1, (la.num_key_heads, la.key_head_dim)),
            k.unflatten(-1, (la.num_key_heads, la.key_head_dim)),
            v.unflatten(-1, (la.num_value_heads, la.value_head_dim)),
        )
