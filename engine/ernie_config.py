"""ERNIE 4.5 MoE's layout, read from config.json (ERNIE-4.5-21B-A3B, -300B-A47B): MoE layers
from `moe_layer_start_index` to `moe_layer_end_index`, every `moe_layer_interval`-th, dense MLPs
elsewhere; `moe_num_shared_experts` ungated shared experts; a float32 softmax router that picks
by probability plus a learned correction bias (`moe_statics`) and renormalises the top-k's
probabilities; interleaved rotary pairs, as Llama 4's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.config import ConfigError
from engine.family_config import RouterConfig


def ernie4_5_moe_fields(
    raw: dict[str, Any], need: Callable[..., Any], num_layers: int, moe_inter: int
) -> dict[str, Any]:
    """The fields of ModelConfig that ERNIE 4.5 sets, with transformers' defaults."""
    if raw.get("use_bias"):
        raise ConfigError(
            "config.json: use_bias=true (biases on every projection) is not supported"
        )
    start = int(raw.get("moe_layer_start_index", 1))
    end = int(raw.get("moe_layer_end_index", -1))
    end = num_layers - 1 if end == -1 else end
    interval = int(raw.get("moe_layer_interval") or 1)
    moe = [i for i in range(num_layers) if (i + 1) % interval == 0 and start <= i <= end]
    dense = tuple(i for i in range(num_layers) if i not in moe)
    return dict(
        router=RouterConfig(
            top_k=int(need("moe_k", "num_experts_per_tok")),
            normalize=True,
            topk_method="noaux_tc",  # softmax scores plus the correction bias pick the experts
            float32_logits=True,
        ),
        rope_interleaved=True,
        rope_float32=True,
        shared_expert_intermediate_size=moe_inter * int(raw.get("moe_num_shared_experts", 2)),
        dense_layers=dense,
        dense_intermediate_size=int(need("intermediate_size")) if dense else 0,
    )
