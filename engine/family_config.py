"""The parts of a config.json that differ by family, read into ModelConfig's fields: routing, local
attention windows, DeepSeek's latent attention and GLM's partial rotary, gpt-oss's and
MiniMax-M2's specifics, and quantized weights (block-wise FP8, MXFP4, GPTQ, AWQ, pack-quantized).
What transformers assumes for fields left out, and scaled rotary frequencies, are in
engine/hf_config.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

from engine.checkpoint_packed_int import packed_int_format
from engine.config import ConfigError
from engine.hf_config import rope_params
from kernels.gating import Gating


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer picks and weighs its experts (see engine/models/router.py)."""

    top_k: int
    normalize: bool  # renormalise the top-k weights to sum to 1
    scoring: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3)
    topk_method: str = "greedy"  # | "group_limited_greedy" (DeepSeek-V2) | "noaux_tc" (V3)
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0  # routed_scaling_factor
    float32_logits: bool = False  # DeepSeek routes in float32 whatever the model's dtype
    bias: bool = False  # gpt-oss adds a learned bias to the router logits

    @property
    def correction_bias(self) -> bool:
        """V3's learned bias, added to the scores only to pick experts."""
        return self.topk_method == "noaux_tc"


@dataclass(frozen=True)
class LocalAttention:
    """Which earlier keys a local layer's query sees: the last `size` positions, itself included
    (a sliding window: gpt-oss), or only those of its own `size`-aligned chunk (Llama 4)."""

    size: int
    chunked: bool = False

    def first_key(self, pos: Any) -> Any:
        """The earliest key position a query at `pos` (an int or a tensor) may see; may be < 0."""
        return (pos // self.size) * self.size if self.chunked else pos - self.size + 1


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention: keys and values are up-projected from one shared
    `kv_lora_rank` latent, plus a `qk_rope_head_dim` rotary key shared by all heads."""

    q_lora_rank: int | None  # None: one q_proj; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # rotary pairs are adjacent dims (x0, x1), not halves

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def quantization_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """How the checkpoint's weights are quantized: block-wise FP8 (`fp8_block`, see below),
    gpt-oss's MXFP4 routed experts (`mxfp4_experts`), or GPTQ's, AWQ's and compressed-tensors'
    packed integers (`packed_int`); other formats are refused."""
    quant = raw.get("quantization_config")
    if quant and quant.get("quant_method") in ("gptq", "awq", "compressed-tensors"):
        return dict(packed_int=packed_int_format(quant))
    if not quant or quant.get("quant_method") != "mxfp4":
        return dict(fp8_block=fp8_block(quant))
    if raw.get("model_type") != "gpt_oss":
        raise ConfigError("config.json: quant_method 'mxfp4' is supported for gpt_oss only")
    for key in ("hidden_size", "intermediate_size"):
        if int(raw.get(key) or 0) % 32:
            raise ConfigError(f"config.json: MXFP4 experts need {key} a multiple of 32")
    return dict(mxfp4_experts=True)


def fp8_block(quant: dict[str, Any] | None) -> tuple[int, int] | None:
    """The (rows, columns) of a weight block sharing one scale, for the block-wise FP8 checkpoints
    DeepSeek-V3 and Qwen3's -FP8 releases ship."""
    if not quant:
        return None
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8":
        raise ConfigError(
            f"config.json: quantization_config.quant_method={method!r} is not supported "
            "(block-wise 'fp8', 'gptq', 'awq', 'compressed-tensors', and 'mxfp4' for gpt_oss)"
        )
    if not (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"config.json: quantization_config.weight_block_size={block!r}: block-wise fp8 needs "
            "two positive numbers (per-tensor FP8 is not supported)"
        )
    return block[0], block[1]


def _grouped_router(
    raw: dict[str, Any], need: Callable[..., Any], scoring: str, method: str
) -> RouterConfig:
    """DeepSeek's router, also GLM-4.5's: top-k within the best `topk_group` of `n_group` expert
    groups (unless greedy), weights scaled by `routed_scaling_factor`, logits in float32."""
    num_experts = int(need("n_routed_experts"))
    groups = int(raw.get("n_group") or 1) if method != "greedy" else 1
    topk_groups = int(raw.get("topk_group") or 1) if method != "greedy" else 1
    if num_experts % groups or not 1 <= topk_groups <= groups:
        raise ConfigError(
            f"config.json: n_group={groups} must divide n_routed_experts={num_experts} and "
            f"topk_group={topk_groups} must be in 1..n_group"
        )
    router = RouterConfig(
        top_k=int(need("num_experts_per_tok")),
        normalize=bool(raw.get("norm_topk_prob", False)),
        scoring=scoring,
        topk_method=method,
        num_groups=groups,
        topk_groups=topk_groups,
        scaling=float(raw.get("routed_scaling_factor") or 1.0),
        float32_logits=True,
    )
    if router.top_k > topk_groups * (num_experts // groups):
        raise ConfigError(
            f"config.json: num_experts_per_tok={router.top_k} exceeds the experts of topk_group="
            f"{topk_groups} groups"
        )
    return router


def glm4_moe_fields(
    raw: dict[str, Any], need: Callable[..., Any], num_layers: int, moe_inter: int
) -> dict[str, Any]:
    """GLM-4.5 / 4.6: grouped-query attention with q/k/v biases, optional per-head q/k norms, and
    rotary over the leading `partial_rotary_factor` of each head (0.5 unless said, as in
    transformers); DeepSeek-V3's routing and ungated shared experts; dense MLPs in the first
    `first_k_dense_replace` layers."""
    factor = rope_params(raw)[1].get("partial_rotary_factor")  # transformers' order
    factor = raw.get("partial_rotary_factor", 0.5) if factor is None else factor
    if not 0.0 < float(factor) <= 1.0:
        raise ConfigError(f"config.json: partial_rotary_factor={factor!r} must be in (0, 1]")
    first_dense = int(raw.get("first_k_dense_replace") or 0)
    return dict(
        router=_grouped_router(raw, need, "sigmoid", "noaux_tc"),
        qk_norm="head" if raw.get("use_qk_norm") else "none",
        partial_rotary_factor=float(factor),
        shared_expert_intermediate_size=moe_inter * int(raw.get("n_shared_experts") or 0),
        dense_layers=tuple(range(min(first_dense, num_layers))),
    )


def minimax_m2_fields(
    raw: dict[str, Any], need: Callable[..., Any], head_dim: int
) -> dict[str, Any]:
    """MiniMax-M2: q and k RMS-normed over all heads at once (as OLMoE's), rotary over the leading
    `rotary_dim` of each head, and Mixtral's experts behind a sigmoid router that picks by score
    plus a learned correction bias (DeepSeek-V3's rule, one group) and renormalises the top-k."""
    factor = rope_params(raw)[1].get("partial_rotary_factor") or raw.get("partial_rotary_factor")
    if factor is None:
        factor = (raw.get("rotary_dim") or head_dim) / head_dim
    if not 0.0 < float(factor) <= 1.0:
        raise ConfigError(f"config.json: rotary_dim / head_dim = {factor!r} must be in (0, 1]")
    if (raw.get("scoring_func") or "sigmoid") != "sigmoid":
        raise ConfigError(f"config.json: scoring_func={raw['scoring_func']!r} is not supported")
    method = "noaux_tc" if raw.get("use_routing_bias", True) else "greedy"
    return dict(
        router=RouterConfig(
            top_k=int(need("num_experts_per_tok")),
            normalize=True,
            scoring="sigmoid",
            topk_method=method,
        ),
        qk_norm=_minimax_qk_norm(raw),
        partial_rotary_factor=float(factor),
    )


def _minimax_qk_norm(raw: dict[str, Any]) -> str:
    """MiniMax-M2's q/k norms: over all heads at once (`per_layer`), as transformers has them."""
    if not raw.get("use_qk_norm", True):
        return "none"
    kind = raw.get("qk_norm_type") or "per_layer"
    if kind != "per_layer":
        raise ConfigError(f"config.json: qk_norm_type={kind!r} is not supported (per_layer)")
    return "full"


def gpt_oss_fields(
    raw: dict[str, Any], need: Callable[..., Any], num_layers: int
) -> dict[str, Any]:
    """gpt-oss: biases on every attention projection and on the router and experts, a learned
    softmax sink per head, a sliding window on the layers `layer_types` names (every other one
    unless said, as in transformers), and experts gated by a clamped SwiGLU (alpha 1.702, up + 1)
    whose gate and up rows interleave on the hub (the loader separates them)."""
    default_types = [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
    ]
    layer_types = raw.get("layer_types") or default_types
    if len(layer_types) != num_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(
            f"config.json: layer_types must name sliding_attention or full_attention for each of "
            f"{num_layers} layers"
        )
    sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    window = int(raw.get("sliding_window") or 0)
    if sliding and window < 1:
        raise ConfigError("config.json: sliding_attention layers need a positive sliding_window")
    limit = raw.get("swiglu_limit", 7.0)
    if limit is not None and float(limit) <= 0:
        raise ConfigError(f"config.json: swiglu_limit={limit!r} must be positive")
    return dict(
        router=RouterConfig(top_k=int(need("num_experts_per_tok")), normalize=True, bias=True),
        o_bias=bool(raw.get("attention_bias", True)),
        qkv_bias=bool(raw.get("attention_bias", True)),
        attention_sinks=True,
        local_attention=LocalAttention(window) if sliding else None,
        local_layers=sliding,
        expert_bias=True,
        gating=Gating(
            alpha=float(raw.get("swiglu_alpha") or 1.702),
            limit=None if limit is None else float(limit),
            up_offset=1.0,
        ),
    )


def deepseek_fields(
    raw: dict[str, Any], need: Callable[..., Any], num_layers: int, moe_inter: int
) -> dict[str, Any]:
    """DeepSeek-V2/V3 (and GLM-4.7-Flash, `glm4_moe_lite`, V3's architecture): latent attention,
    grouped routing, ungated shared experts, and dense MLPs in the first `first_k_dense_replace`
    layers (then every `moe_layer_freq`-th layer is MoE), or where `mlp_layer_types` says."""
    v3 = raw["model_type"] in ("deepseek_v3", "glm4_moe_lite")
    scoring = raw.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    method = raw.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    if (scoring, method) not in (
        ("softmax", "greedy"),
        ("softmax", "group_limited_greedy"),
        ("sigmoid", "noaux_tc"),
    ):
        raise ConfigError(
            f"config.json: scoring_func={scoring!r} with topk_method={method!r} is not supported"
        )
    router = _grouped_router(raw, need, scoring, method)
    mla = MLAConfig(
        q_lora_rank=None if raw.get("q_lora_rank") is None else int(raw["q_lora_rank"]),
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        qk_rope_head_dim=int(need("qk_rope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        rope_interleave=bool(raw.get("rope_interleave", True)) if v3 else True,
    )
    first_dense = int(raw.get("first_k_dense_replace") or 0)
    freq = int(raw.get("moe_layer_freq") or 1)
    dense = tuple(i for i in range(num_layers) if i < first_dense or i % freq)
    if raw["model_type"] == "glm4_moe_lite":  # transformers reads only this, dense first if unsaid
        types = raw.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers - 1)
        if len(types) != num_layers or set(types) - {"dense", "sparse"}:
            raise ConfigError(
                f"config.json: mlp_layer_types must name dense or sparse for each of "
                f"{num_layers} layers"
            )
        dense = tuple(i for i, kind in enumerate(types) if kind == "dense")
    return dict(
        router=router,
        mla=mla,
        head_dim=mla.qk_rope_head_dim,  # what the rotary embedding turns
        # YaRN's mscale sharpens the softmax as well as scaling cos/sin
        attention_scale=yarn_apply_mscale(rope_params(raw)[1], mla.qk_head_dim**-0.5),
        shared_expert_intermediate_size=moe_inter * int(raw.get("n_shared_experts") or 0),
        dense_layers=dense,
    )
