"""What the user asked for (EngineConfig), and the error any bad flag or checkpoint raises. What the
checkpoint says is `engine.model_config.ModelConfig`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from kernels.fused_moe import triton_backend

# The bundled demo model next to the source tree; $EXPERTFLOW_MODEL points elsewhere (e.g. an install).
DEFAULT_MODEL = os.environ.get(
    "EXPERTFLOW_MODEL", str(Path(__file__).resolve().parent.parent / "models" / "expertflow-demo")
)
CACHE_POLICIES = ("lru", "lfu", "expertflow")
PREDICTORS = ("none", "pregate", "rpp", "hybrid")
EXPERT_QUANTIZATIONS = ("none", "fp8", "mxfp4", "int4")
PACKED_SLOTS = ("auto", "packed", "decoded")
DEFAULT_MAX_NUM_SEQS = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_CACHE_DTYPES = {  # vLLM's names; "fp8" is e4m3 (more mantissa: what keys and values need)
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def serving_dtype(requested: str, device: str, checkpoint: str | None) -> str:
    """--dtype as given; auto: float32 on the CPU (no fast half-precision kernels there, and what
    the tests compare with transformers in), else the checkpoint's 16-bit dtype (config.json's
    torch_dtype), bfloat16 for a 32-bit or unnamed one, as vLLM serves them."""
    if requested != "auto":
        return requested
    if device == "cpu":
        return "float32"
    return checkpoint if checkpoint in ("bfloat16", "float16") else "bfloat16"


class ConfigError(ValueError):
    """A checkpoint or flag we cannot serve; the message names the offending field."""


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
    dtype: str = flag(
        "auto",
        "weight and activation dtype; auto: the checkpoint's on CUDA (a 32-bit one in bfloat16), "
        "float32 on the CPU",
        choices=("auto", *DTYPES),
    )
    max_model_len: int | None = flag(None, "context length (default: the model's)")
    max_num_seqs: int | None = flag(
        None,
        f"sequences per step at most (default: {DEFAULT_MAX_NUM_SEQS}; for linear-attention "
        "models, as many as 1 GiB of their per-sequence states holds)",
    )
    max_num_batched_tokens: int = flag(2048, "tokens per step at most (prefill is chunked to fit)")
    kv_cache_blocks: int | None = flag(
        None, "KV cache blocks (default: enough for max_num_seqs full contexts, capped)"
    )
    block_size: int = flag(16, "tokens per KV cache block (at most --max-model-len)")
    kv_cache_dtype: str = flag(
        "auto",
        "what the KV cache holds: auto (the model's dtype) or FP8 (half of bfloat16's bytes: twice "
        "the tokens in the same memory; keys and values rounded once)",
        choices=tuple(KV_CACHE_DTYPES),
    )
    enable_prefix_caching: bool = flag(
        True, "reuse the KV blocks of prompt prefixes computed before (chat turns, system prompts)"
    )
    seed: int = flag(0, "seed of the engine's sampling generator")
    expert_cache_ratio: float | None = flag(
        None,
        "fraction of all routed experts kept in device slots (default: on CUDA as many as fit "
        "in --gpu-memory-utilization, on the CPU all)",
    )
    expert_cache_size: int | None = flag(
        None, "expert cache slots (overrides --expert-cache-ratio)"
    )
    gpu_memory_utilization: float = flag(
        0.9,
        "fraction of the GPU's memory to use: weights, KV cache, activations, and expert slots "
        "sized to the rest when neither --expert-cache-ratio nor --expert-cache-size is given",
    )
    cache_policy: str = flag("lru", "expert cache eviction policy", choices=CACHE_POLICIES)
    predictor: str = flag("none", "routing predictor feeding the prefetcher", choices=PREDICTORS)
    predictor_path: str | None = flag(None, "trained predictor file (for rpp and hybrid)")
    prefetch_horizon: str = flag(
        "auto",
        "MoE layers to prefetch ahead: auto (EF-25's rule) or N, within the MoE layers that "
        "follow (a larger N is clamped to them, with a warning)",
    )
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
    cpu_threads: int | None = flag(
        None,
        "torch threads on the CPU (default: torch's, less one core for the expert link's thread "
        "when experts are offloaded)",
    )
    fp8_experts: bool = flag(
        True,
        "keep an FP8 checkpoint's routed experts FP8 in host memory and over the link, each "
        "dequantized as it lands in its slot (half of bfloat16's bytes to hold and copy)",
    )
    expert_quantization: str = flag(
        "none",
        "quantize a checkpoint's routed experts as they load: fp8 (block-wise; half of "
        "bfloat16's host memory and link bytes), mxfp4 or int4 (about a quarter); changes "
        "outputs by the rounding",
        choices=EXPERT_QUANTIZATIONS,
    )
    mxfp4_slots: str = flag(
        "auto",
        "how device slots hold MXFP4 experts (gpt-oss): packed (decoded by the kernel as it reads "
        "them; 3.8x the experts in the same memory), decoded (in the serving dtype as each copy "
        "lands), or auto: packed on CUDA, decoded on the CPU (whose torch path would decode on "
        "every use)",
        choices=PACKED_SLOTS,
    )
    int4_slots: str = flag(
        "auto",
        "how device slots hold 4-bit experts (GPTQ, AWQ, pack-quantized, int4 at load): packed "
        "(decoded by the kernel as it reads them; 3.8x the experts in the same memory at "
        "128-channel groups; its compiled Triton kernel is not yet measured on a GPU), decoded, "
        "or auto: decoded for now",
        choices=PACKED_SLOTS,
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype={self.dtype!r}: choose auto or one of {', '.join(DTYPES)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but CUDA is not available; use device='cpu'")
        for name in ("mxfp4_slots", "int4_slots"):
            if getattr(self, name) not in PACKED_SLOTS:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r}: choose {', '.join(PACKED_SLOTS)}"
                )
        if self.expert_quantization not in EXPERT_QUANTIZATIONS:
            raise ConfigError(
                f"expert_quantization={self.expert_quantization!r}: choose "
                f"{', '.join(EXPERT_QUANTIZATIONS)}"
            )
        if self.expert_quantization == "fp8" and not self.fp8_experts:
            raise ConfigError("expert_quantization='fp8' contradicts fp8_experts=False")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype={self.kv_cache_dtype!r}: choose one of {', '.join(KV_CACHE_DTYPES)}"
            )
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "max_model_len",
            "cpu_threads",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("expert_cache_ratio", "gpu_memory_utilization"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"{name}={value} must be in (0, 1]")
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
        if self.predictor_path and self.predictor not in ("rpp", "hybrid"):
            raise ConfigError(
                f"predictor_path is read by the rpp and hybrid predictors, not {self.predictor!r}"
            )
        group = self.step_group_size
        if (group is not None and group < 1) or self.max_defer_steps < 0:
            raise ConfigError("token_group_size must be >= 1 and max_defer_steps >= 0")
        seqs = self.max_num_seqs  # None: the engine settles it for the model, then checks again
        if group is not None and seqs is not None and seqs > group * (self.max_defer_steps + 1):
            raise ConfigError(
                f"max_num_seqs={self.max_num_seqs} decodes cannot each run within max_defer_steps="
                f"{self.max_defer_steps} steps in groups of {group}: raise token_group_size or "
                "max_defer_steps, or lower max_num_seqs"
            )
        if not 0 <= self.cache_aware_routing_margin < math.inf:  # NaN compared false: off
            raise ConfigError("cache_aware_routing_margin must be a finite number >= 0")
        if self.prefetch_horizon != "auto" and not (
            str(self.prefetch_horizon).isdigit() and int(self.prefetch_horizon) >= 1
        ):
            raise ConfigError(
                f"prefetch_horizon={self.prefetch_horizon!r}: use auto or a positive integer"
            )
        link = self.link_gbps  # NaN or inf compared false: no delay, logged as emulated
        if link is not None and (not 0 < link < math.inf or self.device != "cpu"):
            raise ConfigError(
                "link_gbps must be a finite number > 0 and is only emulated with device='cpu'"
            )

    @property
    def step_group_size(self) -> int | None:
        """Decodes per step when regrouping, None when every runnable decode runs each step."""
        if self.token_group_size is not None:
            return self.token_group_size
        if self.token_scheduler != "expertflow":
            return None
        return max(1, (self.max_num_seqs or DEFAULT_MAX_NUM_SEQS) // 2)

    def packed_slots(self, int4: bool) -> bool:
        """Whether MXFP4 (or, `int4`, 4-bit integer) experts stay packed in their slots: as
        asked; by default MXFP4 unless no Triton kernel would read them (the CPU, or CUDA
        without triton: the torch path decodes a packed slot on every use), 4-bit integers not
        until their compiled kernel has been run and timed on a GPU."""
        asked = self.int4_slots if int4 else self.mxfp4_slots
        if asked != "auto":
            return asked == "packed"
        return not int4 and self.device == "cuda" and triton_backend() is not None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The serving dtype; an unsettled auto (the engine settles it from the checkpoint,
        engine/settle.py) as if the checkpoint named none."""
        return DTYPES[serving_dtype(self.dtype, self.device, None)]

    @property
    def torch_kv_cache_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or self.torch_dtype

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
