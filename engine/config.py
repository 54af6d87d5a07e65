"""Frozen configs: what the checkpoint says (ModelConfig) and what the user asked for (EngineConfig)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# The bundled demo model next to the source tree; $EXPERTFLOW_MODEL points elsewhere (e.g. an install).
DEFAULT_MODEL = os.environ.get(
    "EXPERTFLOW_MODEL", str(Path(__file__).resolve().parent.parent / "models" / "expertflow-demo")
)
CACHE_POLICIES = ("lru", "lfu", "expertflow")
PREDICTORS = ("none", "pregate", "rpp", "hybrid")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A checkpoint or flag we cannot serve; the message names the offending field."""


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
    top_k: int
    moe_intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    norm_topk_prob: bool
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: over all heads)
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0
    dense_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
        return cls.from_dict(json.loads(config_file.read_text()))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        family = raw.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"config.json: model_type={family!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_FAMILIES)})"
            )

        def need(*keys: str) -> Any:
            for key in keys:
                if raw.get(key) is not None:
                    return raw[key]
            raise ConfigError(f"config.json: missing field {keys[0]!r} required for {family}")

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {}
        for source, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
            rope_type = params.get("rope_type") or params.get("type")
            if rope_type not in (None, "default"):
                raise ConfigError(f"config.json: {source} type {rope_type!r} is not supported")
        if family == "mixtral":
            moe_inter, num_experts = need("intermediate_size"), need("num_local_experts")
        elif family == "olmoe":
            moe_inter, num_experts = need("intermediate_size"), need("num_experts")
        else:
            moe_inter, num_experts = (
                need("moe_intermediate_size"),
                need("num_experts", "num_local_experts"),
            )
        dense_layers: tuple[int, ...] = ()
        if family in ("qwen2_moe", "qwen3_moe"):
            step = int(raw.get("decoder_sparse_step") or 1)
            only_mlp = set(raw.get("mlp_only_layers") or [])
            dense_layers = tuple(
                i for i in range(num_layers) if i in only_mlp or (i + 1) % step != 0
            )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        cfg = cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=int(num_experts),
            top_k=int(need("num_experts_per_tok")),
            moe_intermediate_size=int(moe_inter),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
            norm_topk_prob=True if family == "mixtral" else bool(raw.get("norm_topk_prob", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("qkv_bias", True))
            if family == "qwen2_moe"
            else bool(raw.get("attention_bias", False)),
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, "none"),
            clip_qkv=raw.get("clip_qkv"),
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
            if family == "qwen2_moe"
            else 0,
            dense_intermediate_size=int(raw.get("intermediate_size") or 0) if dense_layers else 0,
            dense_layers=dense_layers,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )
        if cfg.top_k > cfg.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok={cfg.top_k} exceeds the number of experts {cfg.num_experts}"
            )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                "config.json: num_attention_heads must be a multiple of num_key_value_heads"
            )
        return cfg


def flag(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field that also describes its command-line flag (help, choices)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class EngineConfig:
    """Every engine-side flag of `expertflow serve`; `LLM(**kwargs)` takes the same names."""

    model: str = flag(
        DEFAULT_MODEL, "Hugging Face checkpoint folder (default: the bundled demo model)"
    )
    tokenizer: str | None = flag(None, "tokenizer folder (default: the model folder)")
    device: str = flag("cpu", "where the model runs", choices=("cpu", "cuda"))
    dtype: str = flag("float32", "weight and activation dtype", choices=tuple(DTYPES))
    max_model_len: int | None = flag(None, "context length (default: the model's)")
    max_num_seqs: int = flag(64, "sequences per step at most")
    max_num_batched_tokens: int = flag(2048, "tokens per step at most (prefill is chunked to fit)")
    kv_cache_blocks: int | None = flag(
        None, "KV cache blocks (default: enough for max_num_seqs full contexts, capped)"
    )
    block_size: int = flag(16, "tokens per KV cache block")
    seed: int = flag(0, "seed of the engine's sampling generator")
    expert_cache_ratio: float = flag(1.0, "fraction of all routed experts kept in device slots")
    expert_cache_size: int | None = flag(
        None, "expert cache slots (overrides --expert-cache-ratio)"
    )
    cache_policy: str = flag("lru", "expert cache eviction policy", choices=CACHE_POLICIES)
    predictor: str = flag("none", "routing predictor feeding the prefetcher", choices=PREDICTORS)
    predictor_path: str | None = flag(None, "trained predictor file (for rpp and hybrid)")
    prefetch_horizon: str = flag("auto", "MoE layers to prefetch ahead: auto (EF-25's rule) or N")
    token_scheduler: str = flag(
        "fcfs",
        "which runnable decodes share a step when more than --token-group-size are runnable",
        choices=("fcfs", "expertflow"),
    )
    token_group_size: int | None = flag(
        None, "decodes per step (default: all runnable; with expertflow: half of --max-num-seqs)"
    )
    max_defer_steps: int = flag(4, "a runnable sequence waits at most this many consecutive steps")
    resident_first: bool = flag(
        False, "compute resident experts while missing ones are copied (EF-25)"
    )
    cache_aware_routing_margin: float = flag(
        0.0,
        "swap a non-resident expert for a resident one within this router-logit margin (changes outputs; 0 = off)",
    )
    cpu_expert_compute: bool = flag(
        False, "run a missing expert on the host when measured quicker than copying it (Fiddler)"
    )
    link_gbps: float | None = flag(None, "emulate a host-device link of this many GB/s (CPU only)")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available; use device='cpu'")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not 0.0 < self.expert_cache_ratio <= 1.0:
            raise ConfigError(f"expert_cache_ratio={self.expert_cache_ratio} must be in (0, 1]")
        if self.expert_cache_size is not None and self.expert_cache_size < 1:
            raise ConfigError(f"expert_cache_size={self.expert_cache_size} must be >= 1")
        if self.cache_policy not in CACHE_POLICIES:
            raise ConfigError(
                f"cache_policy={self.cache_policy!r}: choose {', '.join(CACHE_POLICIES)}"
            )
        if self.predictor not in PREDICTORS:
            raise ConfigError(f"predictor={self.predictor!r}: choose {', '.join(PREDICTORS)}")
        if self.predictor in ("rpp", "hybrid") and not self.predictor_path:
            raise ConfigError(
                f"predictor={self.predictor!r} needs --predictor-path (train-predictor's output)"
            )
        group = self.step_group_size
        if group is not None and (group < 1 or self.max_defer_steps < 0):
            raise ConfigError("token_group_size must be >= 1 and max_defer_steps >= 0")
        if group is not None and self.max_num_seqs > group * (self.max_defer_steps + 1):
            raise ConfigError(
                f"max_num_seqs={self.max_num_seqs} decodes cannot each run within max_defer_steps="
                f"{self.max_defer_steps} steps in groups of {group}: raise token_group_size or "
                "max_defer_steps, or lower max_num_seqs"
            )
        if self.cache_aware_routing_margin < 0:
            raise ConfigError("cache_aware_routing_margin must be >= 0")
        if self.prefetch_horizon != "auto" and not (
            str(self.prefetch_horizon).isdigit() and int(self.prefetch_horizon) >= 1
        ):
            raise ConfigError(
                f"prefetch_horizon={self.prefetch_horizon!r}: use auto or a positive integer"
            )
        if self.link_gbps is not None and (self.link_gbps <= 0 or self.device != "cpu"):
            raise ConfigError("link_gbps must be > 0 and is only emulated with device='cpu'")

    @property
    def step_group_size(self) -> int | None:
        """Decodes per step when regrouping, None when every runnable decode runs each step."""
        if self.token_group_size is not None:
            return self.token_group_size
        return max(1, self.max_num_seqs // 2) if self.token_scheduler == "expertflow" else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
