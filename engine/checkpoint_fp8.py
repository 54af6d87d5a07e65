"""Block-wise FP8 checkpoints as they lie on disk (DeepSeek-V3's format, Qwen3's -FP8 releases):
float8 weights, each with a `*.weight_scale_inv` of one float32 scale per block of rows x columns.
engine/loader.py dequantizes what the model keeps resident and may keep routed experts FP8
(`copy_fp8`); `check_shape` is the check every loaded weight goes through."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ConfigError
from kernels.fp8 import dequantize_blocks

FP8_SCALE_SUFFIX = "_scale_inv"  # `x.weight_scale_inv` scales the blocks of `x.weight`
FP8_IGNORED_SUFFIXES = ("input_scale", "activation_scale")  # for FP8 matmuls; we dequantize
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_scales(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every `*.weight_scale_inv` of the checkpoint (1/16384 of its weights at 128 x 128 blocks),
    read first: a shard may hold a weight and another shard its scales."""
    scales = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if key.endswith(FP8_SCALE_SUFFIX):
                    scales[key] = f.get_tensor(key)
    return scales


def dequantize_fp8(
    key: str,
    weight: torch.Tensor,
    scales: dict[str, torch.Tensor],
    block: tuple[int, int] | None,
) -> torch.Tensor:
    """An FP8 weight [out, in] times its block scales [ceil(out/b0), ceil(in/b1)] -> float32
    [out, in]; the last blocks of a dimension that is not a multiple of the block are partial."""
    scale = scales.get(key + FP8_SCALE_SUFFIX)
    if block is None or scale is None:
        raise ConfigError(
            f"weight {key!r} is {weight.dtype} but has no {key + FP8_SCALE_SUFFIX!r} "
            "(or config.json no block-wise fp8 quantization_config)"
        )
    if weight.dim() != 2:
        raise ConfigError(
            f"weight {key!r}: block-wise FP8 is supported for 2-D weights, not {weight.dim()}-D "
            "(experts stacked per layer)"
        )
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale.shape) != grid:
        raise ConfigError(
            f"{key + FP8_SCALE_SUFFIX!r} has shape {tuple(scale.shape)}, the {block[0]}x{block[1]} "
            f"blocks of a {rows}x{cols} weight need {grid}"
        )
    return dequantize_blocks(weight, scale, block)


def all_e4m3_with_scales(
    files: list[Path], names: set[str], scales: dict[str, torch.Tensor]
) -> bool:
    """Whether every routed expert weight is float8_e4m3fn with its scales (read from the headers):
    only then can they stay FP8 (else, an e5m2 or a partly quantized checkpoint, all dequantize)."""
    found = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if key in names:
                    if (
                        f.get_slice(key).get_dtype() != "F8_E4M3"
                        or key + FP8_SCALE_SUFFIX not in scales
                    ):
                        return False
                    found += 1
    return found == len(names)


def copy_fp8(
    key: str,
    weight: torch.Tensor,
    scales: dict[str, torch.Tensor],
    dest: torch.Tensor,
    dest_scale: torch.Tensor,
) -> None:
    """An FP8 expert weight and its block scales, kept as they are."""
    scale = scales.get(key + FP8_SCALE_SUFFIX)
    if weight.dtype != torch.float8_e4m3fn or scale is None:
        raise ConfigError(
            f"expert weight {key!r} should be float8_e4m3fn with a {key + FP8_SCALE_SUFFIX!r}, "
            f"as the checkpoint's fp8 quantization_config says; it is {weight.dtype}"
        )
    check_shape(key, weight, dest.shape)
    check_shape(key + FP8_SCALE_SUFFIX, scale, dest_scale.shape)
    dest.copy_(weight)
    dest_scale.copy_(scale)


def check_shape(key: str, tensor: torch.Tensor, shape: torch.Size) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConfigError(
            f"weight {key!r} has shape {tuple(tensor.shape)}, config implies {tuple(shape)}"
        )
