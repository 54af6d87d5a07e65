"""How the loader lays routed experts out in host memory: the HostExperts tensors for the way the
checkpoint stores them (16 or 32-bit floats, FP8 with block scales, MXFP4, or GPTQ's and AWQ's
4-bit integers), and where each hub expert weight lands among them."""

from __future__ import annotations

import torch

from engine.host_experts import HostExperts
from engine.model_config import ModelConfig
from engine.models.family import FamilySpec
from kernels.mxfp4 import BLOCK

# One hub expert weight's destination: "weight" (its rows of w13 or w2) and, when kept quantized,
# "scale" (FP8, int4) and "zero" (int4) rows
Destination = dict[str, torch.Tensor]


def allocate(
    cfg: ModelConfig,
    dtype: torch.dtype,
    fp8_block: tuple[int, int] | None = None,
    int4_group: int | None = None,
    int4_scale_dtype: torch.dtype = torch.float32,
) -> HostExperts:
    """Empty host tensors for every MoE layer's experts: in `dtype`; FP8 with the scales of
    `fp8_block`; 4-bit integers in groups of `int4_group` input channels, with scales in the
    checkpoint's dtype; or MXFP4 blocks when the checkpoint's are (gpt-oss); gpt-oss's biases
    too."""
    I, H, E = cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_experts  # noqa: E741
    experts = HostExperts(layers={}, compute_dtype=dtype)
    for layer in cfg.moe_layers:
        parts: dict[str, torch.Tensor] = {}
        if fp8_block is not None:
            b0, b1 = fp8_block
            parts["w13"] = torch.empty(E, 2 * I, H, dtype=torch.float8_e4m3fn)
            parts["w2"] = torch.empty(E, H, I, dtype=torch.float8_e4m3fn)
            parts["w13_scale"] = torch.empty(E, 2 * I // b0, -(-H // b1))
            parts["w2_scale"] = torch.empty(E, -(-H // b0), -(-I // b1))
        elif int4_group is not None:
            for name, rows, cols in (("w13", 2 * I, H), ("w2", H, I)):
                parts[name] = torch.empty(E, rows, cols // 2, dtype=torch.uint8)
                groups = cols // int4_group
                parts[name + "_scale"] = torch.empty(E, rows, groups, dtype=int4_scale_dtype)
                parts[name + "_zero"] = torch.empty(E, rows, groups, dtype=torch.uint8)
        elif cfg.mxfp4_experts:  # packed as on the hub; `dequantize_mxfp4` as they land
            parts["w13"] = torch.empty(E, 2 * I, H // BLOCK, BLOCK // 2, dtype=torch.uint8)
            parts["w13_scale"] = torch.empty(E, 2 * I, H // BLOCK, dtype=torch.uint8)
            parts["w2"] = torch.empty(E, H, I // BLOCK, BLOCK // 2, dtype=torch.uint8)
            parts["w2_scale"] = torch.empty(E, H, I // BLOCK, dtype=torch.uint8)
        else:
            parts["w13"] = torch.empty(E, 2 * I, H, dtype=dtype)
            parts["w2"] = torch.empty(E, H, I, dtype=dtype)
        if cfg.expert_bias:
            parts["b13"] = torch.empty(E, 2 * I, dtype=dtype)
            parts["b2"] = torch.empty(E, H, dtype=dtype)
        experts.layers[layer] = parts
    experts.fp8_block, experts.int4_group = fp8_block, int4_group
    experts.mxfp4 = cfg.mxfp4_experts
    return experts


def expert_names(spec: FamilySpec, cfg: ModelConfig) -> set[str]:
    """Every routed expert weight of a checkpoint that stores them a tensor per expert."""
    return {
        spec.expert_key(layer, e, part)
        for layer in cfg.moe_layers
        for e in range(cfg.num_experts)
        for part in (spec.gate_proj, spec.up_proj, spec.down_proj)
    }


def destinations(
    experts: HostExperts, spec: FamilySpec, cfg: ModelConfig
) -> dict[str, Destination]:
    """Hub key of each per-expert weight -> its rows of w13 (gate first, then up) or w2, and of
    their scales and zero points where the experts stay quantized."""
    I = cfg.moe_intermediate_size  # noqa: E741
    block = experts.fp8_block
    scale_rows = I // block[0] if block else I  # rows of the gate's scales (FP8: in blocks)
    found: dict[str, Destination] = {}
    for layer, parts in experts.layers.items():
        for e in range(cfg.num_experts):
            for proj, name, rows, scale in (
                (spec.gate_proj, "w13", slice(0, I), slice(0, scale_rows)),
                (spec.up_proj, "w13", slice(I, 2 * I), slice(scale_rows, None)),
                (spec.down_proj, "w2", slice(None), slice(None)),
            ):
                dest = {"weight": parts[name][e, rows]}
                if name + "_scale" in parts:
                    dest["scale"] = parts[name + "_scale"][e, scale]
                if name + "_zero" in parts:
                    dest["zero"] = parts[name + "_zero"][e, rows]
                found[spec.expert_key(layer, e, proj)] = dest
    return found
