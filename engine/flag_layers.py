"""Layer layouts that Mixtral's and Qwen2/Qwen3-MoE's config.json set by flags, as transformers
builds them: dense MLP layers (`decoder_sparse_step`, `mlp_only_layers`) and sliding-window
attention. Official releases leave the window off (Mixtral's says null, Qwen's
use_sliding_window false), but a config that sets it (Mixtral-8x7B's first config.json said
4096, and fine-tunes copied it) windows in transformers: served with full attention, every token
past the window would see keys the model never saw."""

from __future__ import annotations

from typing import Any

from engine.config import ConfigError
from engine.family_config import LocalAttention

WINDOWED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def sparse_step_dense_layers(raw: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """Qwen's dense layers: those in `mlp_only_layers`, and all but every `decoder_sparse_step`-th."""
    step = int(raw.get("decoder_sparse_step") or 1)
    only_mlp = set(raw.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step != 0)


def sliding_window_fields(raw: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The window and the layers it applies to: Mixtral windows every layer wherever
    `sliding_window` is set; Qwen only with `use_sliding_window`, Qwen3-MoE every layer, Qwen2-MoE
    the ones `layer_types` names (every other one below `max_window_layers` unless said)."""
    family, window = raw["model_type"], raw.get("sliding_window")
    if family not in WINDOWED_FAMILIES or window is None:
        return {}
    if family != "mixtral" and not raw.get("use_sliding_window"):
        return {}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"config.json: sliding_window={window!r} must be a positive integer")
    layers = tuple(range(num_layers))
    if family == "qwen2_moe":
        below = int(raw.get("max_window_layers", 28))  # transformers' default
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < below else "full_attention"
            for i in range(num_layers)
        ]
        if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ConfigError(
                f"config.json: layer_types must name sliding_attention or full_attention for "
                f"each of {num_layers} layers"
            )
        layers = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    return dict(local_attention=LocalAttention(window), local_layers=layers) if layers else {}
