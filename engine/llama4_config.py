"""Llama 4's layout, read from config.json (Scout: 16 experts, every layer MoE; Maverick: 128
experts on every other layer, dense MLPs between). Three layers in four turn q and k with an
interleaved rotary, L2-normalise them (`use_qk_norm`) and attend only within their
`attention_chunk_size`-token chunk; every fourth has no rotary (NoPE), attends to the whole
context and sharpens its queries with the position (`attn_temperature_tuning`). The router takes
the top-k logits, weighs each by its sigmoid and scales the expert's input by it; a shared expert
of the routed experts' size runs beside them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.config import ConfigError
from engine.family_config import LocalAttention, RouterConfig


def _layer_list(raw: dict[str, Any], key: str) -> list[Any] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise ConfigError(f"config.json: {key} must be a list, not {value!r}")
    return value


def llama4_fields(raw: dict[str, Any], need: Callable[..., Any], num_layers: int) -> dict[str, Any]:
    """The fields of ModelConfig that Llama 4 sets, with transformers' defaults for what is unsaid."""
    interval = int(raw.get("no_rope_layer_interval") or 4)
    rope_flags = _layer_list(raw, "no_rope_layers") or [
        int((i + 1) % interval != 0) for i in range(num_layers)
    ]  # 1: the layer turns q and k (the name says the opposite, as on the hub)
    if len(rope_flags) < num_layers:
        raise ConfigError(f"config.json: no_rope_layers must name each of {num_layers} layers")
    nope = tuple(i for i in range(num_layers) if not rope_flags[i])
    step = int(raw.get("interleave_moe_layer_step") or 1)
    moe = _layer_list(raw, "moe_layers")
    moe = moe if moe is not None else list(range(step - 1, num_layers, step))
    if any(not isinstance(i, int) or not 0 <= i < num_layers for i in moe):
        raise ConfigError(f"config.json: moe_layers={moe!r} must be layer indices")
    types = _layer_list(raw, "layer_types") or [
        "chunked_attention" if rope_flags[i] else "full_attention" for i in range(num_layers)
    ]
    if len(types) != num_layers or set(types) - {"chunked_attention", "full_attention"}:
        raise ConfigError(
            f"config.json: layer_types must name chunked_attention or full_attention for each "
            f"of {num_layers} layers"
        )
    chunked = tuple(i for i, kind in enumerate(types) if kind == "chunked_attention")
    chunk = raw.get("attention_chunk_size", 8192)  # transformers' default
    if chunked and not (isinstance(chunk, int) and chunk > 0):
        raise ConfigError(
            f"config.json: chunked_attention layers need a positive attention_chunk_size, not "
            f"{chunk!r}"
        )
    temperature = None
    if raw.get("attn_temperature_tuning", True) and nope:
        floor_scale = float(raw.get("floor_scale") or 8192)
        temperature = (floor_scale, float(raw.get("attn_scale", 0.1)))
    inter = int(need("intermediate_size"))
    dense = tuple(i for i in range(num_layers) if i not in moe)
    return dict(
        router=RouterConfig(
            top_k=int(need("num_experts_per_tok")), normalize=False, scoring="sigmoid"
        ),
        router_weights_on_input=True,
        rope_interleaved=True,
        rope_float32=True,
        nope_layers=nope,
        nope_temperature=temperature,
        qk_norm="l2" if raw.get("use_qk_norm", True) else "none",
        local_attention=LocalAttention(chunk, chunked=True) if chunked else None,
        local_layers=chunked,
        shared_expert_intermediate_size=inter,
        dense_layers=dense,
        dense_intermediate_size=int(need("intermediate_size_mlp")) if dense else 0,
    )
