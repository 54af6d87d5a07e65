"""Qwen3-Next's and Qwen3.5's hybrid layout, read from config.json: most layers mix tokens with
Gated DeltaNet linear attention (a fixed-size recurrent state per sequence, no KV cache), every
`full_attention_interval`-th with gated softmax attention over the KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import ConfigError
from engine.family_config import RouterConfig
from engine.hf_config import rope_params


@dataclass(frozen=True)
class LinearAttentionConfig:
    """The Gated DeltaNet layers: `num_key_heads` query/key heads of `key_head_dim`, each serving
    num_value_heads / num_key_heads value heads of `value_head_dim`; a causal depthwise
    convolution of `conv_kernel` taps over q, k and v. `hub_layout` says how the checkpoint
    stores the input projections: "qkvz" (Qwen3-Next: in_proj_qkvz and in_proj_ba, grouped by
    key head) or "split" (Qwen3.5: in_proj_qkv, in_proj_z, in_proj_b, in_proj_a)."""

    layers: tuple[int, ...]
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    hub_layout: str

    @property
    def conv_dim(self) -> int:
        """Channels the convolution mixes: q, k and v."""
        return 2 * self.num_key_heads * self.key_head_dim + self.value_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    def state_bytes(self, itemsize: int) -> int:
        """One sequence's state over every linear layer: the convolution's last K-1 inputs in
        the serving dtype (`itemsize` bytes) and the float32 delta-rule matrix."""
        conv = self.conv_dim * (self.conv_kernel - 1) * itemsize
        recurrent = self.num_value_heads * self.key_head_dim * self.value_head_dim * 4
        return len(self.layers) * (conv + recurrent)


def qwen3_next_fields(
    raw: dict[str, Any], need: Callable[..., Any], num_layers: int
) -> dict[str, Any]:
    """Qwen3-Next (`qwen3_next`) and Qwen3.5-MoE (`qwen3_5_moe`): linear attention on the layers
    `layer_types` names (all but every fourth unless said, as in transformers); gated attention
    with per-head q/k norms and rotary over the leading `partial_rotary_factor` (0.25) of each
    head; zero-centred RMSNorm weights (scaled by 1 + w, folded in at load); a softmax router
    and a shared expert behind a sigmoid gate. Qwen3.5 always renormalises the top-k."""
    interval = int(raw.get("full_attention_interval") or 4)
    default_types = [
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)
    ]
    layer_types = raw.get("layer_types") or default_types
    if len(layer_types) != num_layers or set(layer_types) - {"linear_attention", "full_attention"}:
        raise ConfigError(
            f"config.json: layer_types must name linear_attention or full_attention for each of "
            f"{num_layers} layers"
        )
    if "full_attention" not in layer_types:
        raise ConfigError("config.json: layer_types needs at least one full_attention layer")
    linear = LinearAttentionConfig(
        layers=tuple(i for i, kind in enumerate(layer_types) if kind == "linear_attention"),
        num_key_heads=int(need("linear_num_key_heads")),
        num_value_heads=int(need("linear_num_value_heads")),
        key_head_dim=int(need("linear_key_head_dim")),
        value_head_dim=int(need("linear_value_head_dim")),
        conv_kernel=int(need("linear_conv_kernel_dim")),
        hub_layout="qkvz" if raw["model_type"] == "qwen3_next" else "split",
    )
    if linear.num_value_heads % linear.num_key_heads or linear.conv_kernel < 1:
        raise ConfigError(
            "config.json: linear_num_value_heads must be a multiple of linear_num_key_heads, and "
            "linear_conv_kernel_dim positive"
        )
    if (raw.get("hidden_act") or "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act={raw['hidden_act']!r} is not supported")
    factor = rope_params(raw)[1].get("partial_rotary_factor")
    factor = raw.get("partial_rotary_factor", 0.25) if factor is None else factor
    if not 0.0 < float(factor) <= 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor={factor!r} must be in (0, 1]")
    normalize = raw["model_type"] != "qwen3_next" or bool(raw.get("norm_topk_prob", True))
    return dict(
        linear_attention=linear if linear.layers else None,
        o_bias=bool(raw.get("attention_bias", False)),  # transformers biases o_proj with q/k/v
        attention_output_gate=True,
        zero_centered_norms=True,
        qk_norm="head",
        partial_rotary_factor=float(factor),
        router=RouterConfig(top_k=int(need("num_experts_per_tok")), normalize=normalize),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
        shared_expert_gated=True,
    )
