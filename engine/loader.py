"""Checkpoint folder -> resident model weights + routed expert weights stacked per layer on the host."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.checkpoint_fp8 import (
    FLOAT8_DTYPES,
    FP8_IGNORED_SUFFIXES,
    FP8_SCALE_SUFFIX,
    all_e4m3_with_scales,
    check_shape,
    copy_fp8,
    dequantize_fp8,
    fp8_scales,
)
from engine.checkpoint_packed_int import PackedWeights
from engine.config import ConfigError
from engine.expert_quantization import ExpertQuantizer, int4_group
from engine.host_experts import HostExperts
from engine.host_layout import allocate, destinations, expert_names
from engine.model_config import ModelConfig
from engine.models.family import Convert, FamilySpec
from engine.models.gated_delta import GatedDeltaNet
from engine.models.layers import Attention, RMSNorm
from engine.models.mla import MLAttention
from engine.models.model import MoECausalLM
from engine.progress import progress
from kernels.mxfp4 import BLOCK

logger = logging.getLogger(__name__)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT32_SUFFIXES = ("e_score_correction_bias",)


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's shards, each header read once here: a truncated or corrupt shard, or a
    malformed index, is named (safetensors' own error names no file)."""
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / n for n in names]
        else:
            files = sorted(path.glob("*.safetensors"))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{index}: malformed ({type(exc).__name__}: {exc})") from exc
    if not files:
        raise ConfigError(f"{path}: no *.safetensors weights found")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"{file}: not a readable safetensors file ({exc})") from exc
    return files


def load_model(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    fp8_experts: bool = True,
    quantize_experts: str | None = None,
) -> tuple[MoECausalLM, HostExperts]:
    """Build the model on `device` with its resident weights, and the routed experts on the CPU.
    `fp8_experts`: an FP8 checkpoint's routed experts stay FP8 (else dequantized like the rest);
    `quantize_experts` "fp8", "mxfp4" or "int4": other routed experts are quantized so as they
    load (engine/expert_quantization.py; "mxfp4" and "int4" take an FP8 checkpoint's too)."""
    path = Path(path)
    with torch.device("meta"):
        model = MoECausalLM(cfg)
    expected = {
        k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    spec = model.spec
    moe_layers = cfg.moe_layers
    I, H, E = cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_experts  # noqa: E741
    block = cfg.fp8_block
    files = safetensors_files(path)
    scales = fp8_scales(files) if block else {}
    packed = PackedWeights(cfg.packed_int, files, spec.our_key) if cfg.packed_int else None
    fused = _fused_experts(spec, files, moe_layers[0], cfg.mxfp4_experts)
    names = set() if fused else expert_names(spec, cfg)
    fp8 = (
        fp8_experts
        and quantize_experts not in ("mxfp4", "int4")
        and block is not None
        and not fused
        and I % block[0] == 0  # else a block of rows would mix gate and up
        and all_e4m3_with_scales(files, names, scales)
    )
    int4 = None  # GPTQ's, AWQ's or pack-quantized 4-bit experts stay so: their scales' dtype
    if packed is not None and names and quantize_experts in (None, "int4"):
        int4 = packed.keeps_packed({n.removesuffix(".weight") for n in names}, (H, I))
    if int4 is not None:
        quantize_experts = None  # int4 already: rounding them again would only lose
    kept_group = packed.fmt.group_size if packed is not None and int4 is not None else None
    experts = allocate(cfg, dtype, block if fp8 else None, kept_group, int4 or dtype)
    # fused hub key -> (our part of the layer's experts, its conversion)
    fused_keys = {
        spec.fused_expert_key(layer, hub): (experts.layers[layer][part], convert)
        for layer in moe_layers
        for hub, (part, convert) in (
            spec.fused_mxfp4_experts if cfg.mxfp4_experts else spec.fused_experts
        ).items()
        if fused
    }
    expert_keys = {} if fused else destinations(experts, spec, cfg)  # key -> where it lands

    quantizer = None
    if quantize_experts and cfg.mxfp4_experts:
        raise ConfigError(f"expert_quantization={quantize_experts!r}: the experts are MXFP4")
    if quantize_experts in ("mxfp4", "int4") and (H % BLOCK or I % BLOCK):
        raise ConfigError(
            f"expert_quantization={quantize_experts!r} needs hidden and expert sizes in 32s"
        )
    if quantize_experts and not fp8:  # keys are model.layers.N....
        layer_of = {k: int(k.split(".")[2]) for k in (*expert_keys, *fused_keys)}
        group = int4_group(H, I) or 0  # sizes in 32s: a group always fits
        quantizer = ExpertQuantizer(experts, layer_of, quantize_experts, group=group)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    stacked = stacked_keys(model)
    resident: dict[str, torch.Tensor] = {}
    seen_parts: set[str] = set()
    ignored = IGNORED_SUFFIXES + ((FP8_SCALE_SUFFIX, *FP8_IGNORED_SUFFIXES) if scales else ())
    ignored += packed.fmt.side_suffixes if packed else ()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for hub_key in progress(
                list(f.keys()), desc=f"loading {file.name}", unit="tensor", leave=False
            ):
                key = spec.our_key(hub_key)
                unpacked = packed is not None and key.endswith(packed.fmt.packed_suffix)
                if packed is not None and unpacked:  # dequantized or repacked: our weight
                    key = key.removesuffix(packed.fmt.packed_suffix) + ".weight"
                if (
                    key.endswith(ignored)
                    or key.startswith(spec.ignored_prefixes)
                    or _extra_layer(key, cfg)
                ):
                    continue
                if quantizer is not None:
                    quantizer.check(key)
                tensor = f.get_tensor(hub_key)
                lands = expert_keys.get(key, {})
                if "scale" in lands:  # an expert kept quantized on the host
                    if packed is not None:
                        packed.copy_grouped(key.removesuffix(".weight"), tensor, lands)
                    else:
                        copy_fp8(key, tensor, scales, lands["weight"], lands["scale"])
                    seen_parts.add(key)
                    continue
                if packed is not None and unpacked:
                    tensor = packed.dequantize(key.removesuffix(".weight"), tensor)
                if tensor.dtype in FLOAT8_DTYPES:
                    tensor = dequantize_fp8(key, tensor, scales, cfg.fp8_block)
                if key in fused_keys:
                    dest, convert = fused_keys[key]
                    tensor = convert(tensor)
                    check_shape(key, tensor, dest.shape)
                    dest.copy_(tensor)
                    seen_parts.add(key)
                elif key in expert_keys:
                    check_shape(key, tensor, lands["weight"].shape)
                    lands["weight"].copy_(tensor)
                    seen_parts.add(key)
                elif key in stacked:
                    target, rows, convert = stacked[key]
                    if target not in resident:
                        resident[target] = torch.empty(shapes[target], dtype=dtype)
                    tensor = tensor if convert is None else convert(tensor)
                    check_shape(key, tensor, resident[target][rows].shape)
                    resident[target][rows].copy_(tensor)
                    seen_parts.add(key)
                elif key in expected:  # V3's correction bias stays float32, as in transformers
                    keep = key.endswith(FLOAT32_SUFFIXES + spec.float32_suffixes)
                    for suffix, convert in spec.resident_converts.items():
                        tensor = convert(tensor) if key.endswith(suffix) else tensor
                    resident[key] = tensor.to(torch.float32 if keep else dtype)
                elif packed is not None and _zero_bias(key, tensor, packed.holds):
                    pass  # AutoGPTQ wrote one for every layer it quantized
                elif not (cfg.tie_word_embeddings and key == "lm_head.weight"):
                    raise ConfigError(
                        f"{file.name}: unexpected weight {key!r} for a {cfg.family} model"
                    )
                if quantizer is not None:  # a layer's last expert weight: to FP8
                    quantizer.landed(key)
    missing = sorted(
        (expected - resident.keys())
        | ((expert_keys.keys() | fused_keys.keys() | stacked.keys()) - seen_parts)
    )
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks {len(missing)} weights, first {missing[0]!r}")
    for key, tensor in resident.items():
        check_shape(key, tensor, shapes[key])
    model.load_state_dict(resident, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if cfg.zero_centered_norms:  # Qwen3-Next scales by 1 + w, in float32
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight = nn.Parameter(module.weight.float() + 1.0, requires_grad=False)
    if cfg.mla is not None and cfg.mla.rope_interleave:
        for module in model.modules():
            if isinstance(module, MLAttention):
                module.deinterleave_rope()
    model.rotary = type(model.rotary)(cfg)  # rebuild the meta buffer
    model.to(device)
    logger.info(
        "loaded %s: %d MoE layers x %d experts, %.1f MiB of routed experts%s",
        path.name,
        len(moe_layers),
        E,
        experts.total_bytes / 2**20,
        " (FP8 on the host and the link)" if experts.fp8_block else "",
    )
    if experts.int4_group:
        logger.info(
            "routed experts 4-bit on the host and the link (groups of %d)", experts.int4_group
        )
    return model.eval(), experts


def stacked_keys(model: MoECausalLM) -> dict[str, tuple[str, slice, Convert | None]]:
    """Hub keys that fill rows of one of our fused weights (q/k/v_proj -> qkv_proj, Gated
    DeltaNet's input projections -> in_proj): hub key -> (our key, its rows, its conversion)."""
    stacked = {}
    for name, module in model.named_modules():
        if not isinstance(module, Attention | GatedDeltaNet):
            continue
        for hub, ours, rows, convert in module.stacked_parts():
            has_bias = getattr(module, ours).bias is not None
            for suffix in ("weight", "bias") if has_bias else ("weight",):
                stacked[f"{name}.{hub}.{suffix}"] = (f"{name}.{ours}.{suffix}", rows, convert)
    return stacked


def _fused_experts(spec: FamilySpec, files: list[Path], layer: int, mxfp4: bool) -> bool:
    """Whether the checkpoint stores each layer's experts as one tensor per part: always for a
    family that names no per-expert weights, else (Qwen3.5) when the first MoE layer's are so."""
    parts = spec.fused_mxfp4_experts if mxfp4 else spec.fused_experts
    if not parts or not spec.gate_proj:
        return bool(parts)
    wanted = spec.fused_expert_key(layer, next(iter(parts)))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()
        if any(spec.our_key(k) == wanted for k in names):
            return True
    return False


def _extra_layer(key: str, cfg: ModelConfig) -> bool:
    """DeepSeek-V3, GLM-4.5, GLM-4.7-Flash and MiniMax-M2 checkpoints append multi-token-prediction layers
    after the last decoder layer; serving predicts one token at a time, so they are skipped (as
    transformers does)."""
    parts = key.split(".")
    return (
        cfg.family.startswith(("deepseek", "glm4_moe", "minimax_m2"))
        and key.startswith("model.layers.")
        and parts[2].isdigit()
        and int(parts[2]) >= cfg.num_layers
    )


def _zero_bias(key: str, tensor: torch.Tensor, packed: Callable[[str], bool]) -> bool:
    """A bias the model has no place for, beside a packed layer: harmless when all zeros (older
    AutoGPTQ saved one for every layer), refused otherwise."""
    prefix = key.removesuffix(".bias")
    if not key.endswith(".bias") or not packed(prefix):
        return False
    if bool(tensor.any()):
        raise ConfigError(f"weight {key!r}: a nonzero bias on a layer that has none")
    return True
