"""What a checkpoint's config.json says, normalised across families: ModelConfig (its
family-specific parts are read in engine/family_config.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from engine.checkpoint_packed_int import PackedIntFormat
from engine.config import ConfigError
from engine.ernie_config import ernie4_5_moe_fields
from engine.family_config import (
    LocalAttention,
    MLAConfig,
    RouterConfig,
    deepseek_fields,
    glm4_moe_fields,
    gpt_oss_fields,
    minimax_m2_fields,
    quantization_fields,
)
from engine.flag_layers import sliding_window_fields, sparse_step_dense_layers
from engine.hf_config import (
    TEXT_CONFIGS,
    config_defaults,
    default_rope_theta,
    rope_scaling_fields,
)
from engine.hybrid_config import LinearAttentionConfig, qwen3_next_fields
from engine.llama4_config import llama4_fields
from kernels.gating import SILU, Gating

SUPPORTED_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe_lite",
    "glm4_moe",
    "gpt_oss",
    "minimax_m2",
    "qwen3_next",
    "qwen3_5_moe",
    "llama4",
    "ernie4_5_moe",
)

# Checkpoints that name their own model_type for an architecture we serve (Kimi-K2's is
# DeepSeek-V3's, with its own config class on the hub, not in transformers).
MODEL_TYPE_ALIASES = {
    "kimi_k2": "deepseek_v3",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "llama4_text": "llama4",
}
POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
POSITIVE_SIZES += ("head_dim", "moe_intermediate_size", "max_position_embeddings", "top_k")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one checkpoint, normalised across families."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    router: RouterConfig
    moe_intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    # "none" | "head" (Qwen3: per head) | "full" (OLMoE: over all heads) | "l2" (Llama 4: per
    # head, no weight, on rotary layers)
    qk_norm: str = "none"
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0
    shared_expert_gated: bool = False  # Qwen2-MoE's sigmoid gate on its shared expert
    dense_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    rope_inv_freq: tuple[float, ...] = ()  # a scaled rotary's frequencies; (): rope_theta's
    rope_attention_factor: float = 1.0  # scales cos and sin (YaRN)
    mla: MLAConfig | None = None  # DeepSeek's attention; None: grouped-query attention
    attention_scale: float | None = None  # softmax scale; None: 1/sqrt(query head dim)
    partial_rotary_factor: float = 1.0  # GLM-4.5 turns the first half of each head, not all
    fp8_block: tuple[int, int] | None = None  # block-wise FP8 weights, dequantized at load
    packed_int: PackedIntFormat | None = None  # GPTQ's, AWQ's or pack-quantized integer weights
    o_bias: bool = False  # a bias on the attention's output projection (gpt-oss)
    attention_sinks: bool = False  # gpt-oss: a learned logit per head joins each softmax
    local_attention: LocalAttention | None = None  # a sliding window or chunks, on local_layers
    local_layers: tuple[int, ...] = ()
    expert_bias: bool = False  # routed experts add a bias after each GEMM (gpt-oss)
    gating: Gating = SILU  # the routed experts' activation
    mxfp4_experts: bool = False  # routed experts in MXFP4 (gpt-oss's release), kept so on the host
    linear_attention: LinearAttentionConfig | None = None  # Qwen3-Next's Gated DeltaNet layers
    attention_output_gate: bool = False  # q_proj also yields a sigmoid gate on attention's output
    zero_centered_norms: bool = False  # RMSNorm weights scale by 1 + w (the loader adds the 1)
    rope_interleaved: bool = False  # rotary pairs adjacent on the hub: q/k rows permuted at load
    rope_float32: bool = False  # q and k turn in float32 whatever the dtype (Llama 4, ERNIE 4.5)
    nope_layers: tuple[int, ...] = ()  # layers without rotary (Llama 4)
    nope_temperature: tuple[float, float] | None = None  # their (floor_scale, attn_scale)
    router_weights_on_input: bool = False  # Llama 4 weighs each expert's input, not its output
    checkpoint_dtype: str | None = None  # config.json's torch_dtype (or dtype): for --dtype auto

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each query/key head that the rotary embedding turns."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_cache_geometry(self) -> tuple[int, int, int]:
        """(heads, key dim, value dim) of one token's cache entry per layer. MLA caches its latent
        and rotary key as one head and reads values from the latent: value dim 0 (no V tensor)."""
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim, 0
        return self.num_kv_heads, self.head_dim, self.head_dim

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers that attend over the KV cache (all but the linear-attention ones)."""
        linear = self.linear_attention.layers if self.linear_attention else ()
        return tuple(i for i in range(self.num_layers) if i not in linear)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """A bad config.json (not JSON, wrong types, sizes < 1, a family or a field we do not
        serve) is a ConfigError naming it by its path: from_dict's say only "config.json"."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
        try:
            raw = json.loads(config_file.read_text())
            gptq = Path(path) / "quantize_config.json"  # AutoGPTQ's, beside config.json
            if "quantization_config" not in raw and gptq.is_file():
                quant = json.loads(gptq.read_text())
                raw["quantization_config"] = {"quant_method": "gptq", **quant}
            cfg = cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {str(e).removeprefix('config.json: ')}") from e
        except (ValueError, TypeError, ArithmeticError, AttributeError, KeyError, OSError) as e:
            raise ConfigError(f"{config_file}: malformed ({type(e).__name__}: {e})") from e
        if small := next((k for k in POSITIVE_SIZES if getattr(cfg, k) < 1), None):
            raise ConfigError(f"{config_file}: {small}={getattr(cfg, small)} must be >= 1")
        return cfg

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        family = raw.get("model_type")
        if family in TEXT_CONFIGS and isinstance(raw.get("text_config"), dict):  # a VL release
            tied = {k: raw[k] for k in ("tie_word_embeddings",) if k in raw}  # the VL model's
            raw = {**raw, **raw["text_config"], **tied, "model_type": family}
        if raw.get("model_type") in MODEL_TYPE_ALIASES:  # read as the family it is built as
            raw = {**raw, "model_type": MODEL_TYPE_ALIASES[raw["model_type"]]}
        family = raw.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"config.json: model_type={family!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_FAMILIES)})"
            )
        raw = {**config_defaults(family), **raw}  # a field set to null stays null

        def need(*keys: str) -> Any:
            for key in keys:
                if raw.get(key) is not None:
                    return raw[key]
            raise ConfigError(f"config.json: missing field {keys[0]!r} required for {family}")

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        rope = raw.get("rope_parameters") or {}
        if family in ("mixtral", "gpt_oss", "minimax_m2", "llama4"):
            moe_inter, num_experts = need("intermediate_size"), need("num_local_experts")
        elif family.startswith(("deepseek", "glm4_moe")):
            moe_inter, num_experts = need("moe_intermediate_size"), need("n_routed_experts")
        elif family == "olmoe":
            moe_inter, num_experts = need("intermediate_size"), need("num_experts")
        elif family == "ernie4_5_moe":
            moe_inter, num_experts = need("moe_intermediate_size"), need("moe_num_experts")
        else:
            moe_inter, num_experts = (
                need("moe_intermediate_size"),
                need("num_experts", "num_local_experts"),
            )
        dense_layers: tuple[int, ...] = ()
        if family in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
            dense_layers = sparse_step_dense_layers(raw, num_layers)
        family_fields: dict[str, Any] = sliding_window_fields(raw, num_layers)
        if family.startswith("deepseek") or family == "glm4_moe_lite":
            family_fields |= deepseek_fields(raw, need, num_layers, int(moe_inter))
            dense_layers = family_fields.pop("dense_layers")
        elif family == "glm4_moe":
            family_fields |= glm4_moe_fields(raw, need, num_layers, int(moe_inter))
            dense_layers = family_fields.pop("dense_layers")
        elif family == "gpt_oss":
            family_fields |= gpt_oss_fields(raw, need, num_layers)
        elif family in ("qwen3_next", "qwen3_5_moe"):
            family_fields |= qwen3_next_fields(raw, need, num_layers)
        elif family == "llama4":
            family_fields |= llama4_fields(raw, need, num_layers)
        elif family == "ernie4_5_moe":
            family_fields |= ernie4_5_moe_fields(raw, need, num_layers, int(moe_inter))
        elif family == "minimax_m2":
            family_fields |= minimax_m2_fields(
                raw, need, int(raw.get("head_dim") or hidden // heads)
            )
        # after the family's own checks: transformers' config class validates fields too
        family_fields |= rope_scaling_fields(raw, int(raw.get("head_dim") or hidden // heads))
        router = RouterConfig(
            top_k=int(need("num_experts_per_tok", "moe_k")),
            normalize=True if family == "mixtral" else bool(raw.get("norm_topk_prob", False)),
        )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        fields_ = dict(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=int(num_experts),
            router=router,
            moe_intermediate_size=int(moe_inter),
            rope_theta=float(
                raw.get("rope_theta") or rope.get("rope_theta") or default_rope_theta(family)
            ),
            rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("qkv_bias", True))
            if family == "qwen2_moe"
            else bool(raw.get("attention_bias", False)),
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
            clip_qkv=raw.get("clip_qkv"),
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
            if family == "qwen2_moe"
            else 0,
            shared_expert_gated=family == "qwen2_moe",
            dense_intermediate_size=int(raw.get("intermediate_size") or 0) if dense_layers else 0,
            dense_layers=dense_layers,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            checkpoint_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            **quantization_fields(raw),
        )
        cfg = cls(**{**fields_, **family_fields})
        if cfg.top_k > cfg.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok={cfg.top_k} exceeds the number of experts {cfg.num_experts}"
            )
        if not cfg.moe_layers:
            raise ConfigError(
                f"config.json: no MoE layer among {num_layers} (first_k_dense_replace, "
                "mlp_only_layers or decoder_sparse_step make them all dense)"
            )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                "config.json: num_attention_heads must be a multiple of num_key_value_heads"
            )
        return cfg


def generation_eos_ids(path: str | Path) -> tuple[int, ...]:
    """The EOS ids generation_config.json names beside config.json's: gpt-oss's `<|call|>`,
    Llama 3's `<|eot_id|>`. Generation stops on them, as transformers' generate and vLLM stop."""
    if not (Path(path) / "generation_config.json").is_file():
        return ()
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError as e:  # not JSON
        raise ConfigError(f"{path}: generation_config.json: {e}") from e
    ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"generation_config.json: eos_token_id={eos!r} must be token ids")
    return tuple(ids)
