"""What transformers' own config classes say about a config.json: the defaults of fields it
leaves out where families differ, and the frequencies of a scaled rotary embedding. Read through
the classes themselves, so that a checkpoint means here what it means to transformers."""

from __future__ import annotations

import functools
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from engine.config import ConfigError

STATIC_ROPE_SCALINGS = ("linear", "yarn", "llama3")
# Families whose model_type names a vision-language wrapper: the text model's config class
TEXT_CONFIGS = {"qwen3_5_moe": "qwen3_5_moe_text", "llama4": "llama4_text"}


DEFAULTED_FIELDS = (
    "tie_word_embeddings",  # True for ERNIE 4.5, False for most
    "norm_topk_prob",
    "first_k_dense_replace",
    "n_shared_experts",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
)
# Fields older transformers wrote with a type transformers 5's strict config classes refuse, and
# read by truthiness: Llama 4's releases say attn_temperature_tuning=4 (transformers 4.51's).
LEGACY_FLAGS = ("attn_temperature_tuning",)


@functools.cache
def config_defaults(family: str) -> dict[str, Any]:
    """What transformers assumes for the fields a config.json leaves out where families differ
    (DeepSeek-V3 and GLM-4.5 renormalise the top-k by default, V3 has 3 dense layers, ERNIE 4.5
    ties its embeddings); transformers' save_pretrained leaves out what equals its defaults."""
    defaults = CONFIG_MAPPING[TEXT_CONFIGS.get(family, family)]()
    return {
        k: getattr(defaults, k) for k in DEFAULTED_FIELDS if getattr(defaults, k, None) is not None
    }


@functools.cache
def default_rope_theta(family: str) -> float:
    """The rotary base transformers assumes when a config.json names none (Mixtral's 1e6, Llama
    4's and ERNIE 4.5's 5e5, gpt-oss's 1.5e5, ...)."""
    defaults = CONFIG_MAPPING[TEXT_CONFIGS.get(family, family)]()
    return float((getattr(defaults, "rope_parameters", None) or {}).get("rope_theta") or 10000.0)


def rope_params(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the field that holds them, the rotary parameters with `rope_type` named): transformers 5
    writes `rope_parameters`, older checkpoints `rope_scaling` with a `type`, which wins (as in
    transformers)."""
    source = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(source) or {}
    return source, {
        **params,
        "rope_type": params.get("rope_type") or params.get("type") or "default",
    }


def rope_scaling_fields(raw: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Frequencies of a scaled rotary embedding (linear, YaRN, Llama 3), computed by transformers
    once. Scalings that change with the sequence length (dynamic NTK, LongRoPE) are refused."""
    source, params = rope_params(raw)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return {}
    if rope_type not in STATIC_ROPE_SCALINGS:
        raise ConfigError(
            f"config.json: {source} type {rope_type!r} is not supported "
            f"(supported: default, {', '.join(STATIC_ROPE_SCALINGS)})"
        )
    try:
        model_type = raw["model_type"]
        flags = {k: bool(raw[k]) for k in LEGACY_FLAGS if isinstance(raw.get(k), int)}
        hf_config = CONFIG_MAPPING[TEXT_CONFIGS.get(model_type, model_type)].from_dict(
            {**raw, **flags}
        )
        if getattr(hf_config, "head_dim", None) is None:  # Mixtral writes null
            hf_config.head_dim = head_dim
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    except (KeyError, TypeError, ValueError, AttributeError, StrictDataclassError) as e:
        raise ConfigError(f"config.json: {source} of type {rope_type!r} is malformed: {e}") from e
    return dict(
        rope_inv_freq=tuple(inv_freq.tolist()), rope_attention_factor=float(attention_factor)
    )
