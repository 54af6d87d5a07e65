"""`--expert-quantization fp8|mxfp4|int4`: a 16 or 32-bit checkpoint's routed experts quantized on
the host as they load, for families with no such release of their own (Llama 4, Mixtral, ...) and
without a converted copy on disk (`expertflow quantize-fp8` cannot convert experts stored a
tensor per layer). FP8 (block-wise, DeepSeek-V3's format) takes half of bfloat16's host memory
and link bytes; MXFP4 (gpt-oss's format) and int4 (4-bit integers with a float16 scale and a
zero point per group of input channels, kernels/int4.py) about a quarter. Each is then served
as a release in that format is: dequantized as it lands in a slot, or for MXFP4 and int4 kept
packed in the slot where `--mxfp4-slots` / `--int4-slots` say so.

Each MoE layer is quantized as soon as its last expert weight lands and its wide copy freed, so
loading never holds much more than the quantized experts plus the layers still arriving (Llama 4
Scout: 90 GiB in FP8, 48 in MXFP4, instead of 180)."""

from __future__ import annotations

import torch

from engine.config import ConfigError
from engine.host_experts import HostExperts
from kernels.fp8 import FP8, quantize_blocks
from kernels.int4 import quantize_int4
from kernels.mxfp4 import BLOCK as MXFP4_BLOCK
from kernels.mxfp4 import quantize_mxfp4

BLOCK = (128, 128)  # FP8's: DeepSeek-V3's and Qwen3-FP8's
ROWS = 1024  # rows quantized to MXFP4 or int4 at a time: bounds their temporaries
INT4_GROUPS = (128, 64, 32)  # the widest that divides both the hidden and the expert size


def int4_group(hidden: int, inter: int) -> int | None:
    """The input channels a scale for `--expert-quantization int4`, None if none fits."""
    return next((g for g in INT4_GROUPS if hidden % g == 0 and inter % g == 0), None)


class ExpertQuantizer:
    """Counts the hub weights landing in each MoE layer's experts (`layer_of`: hub key -> layer)
    and quantizes a layer, to `scheme` "fp8", "mxfp4" or "int4" (in groups of `group`), once
    all of them have."""

    def __init__(
        self,
        experts: HostExperts,
        layer_of: dict[str, int],
        scheme: str = "fp8",
        block: tuple[int, int] | None = None,
        group: int = 128,
    ) -> None:
        self.experts, self.layer_of, self.scheme = experts, layer_of, scheme
        self.block, self.group = block or BLOCK, group
        self.pending: dict[int, set[str]] = {}  # layer -> its expert weights still to land
        for key, layer in layer_of.items():
            self.pending.setdefault(layer, set()).add(key)
        if scheme == "fp8":
            experts.fp8_block = self.block
        elif scheme == "int4":
            experts.int4_group = group
        else:
            experts.mxfp4 = True

    def check(self, key: str) -> None:
        """Before a hub weight is copied: refuse a second copy of an expert weight whose layer is
        quantized already (its wide storage is freed)."""
        layer = self.layer_of.get(key)
        if layer is not None and not self.pending[layer]:
            raise ConfigError(f"{key!r} appears twice in the checkpoint")

    def landed(self, key: str) -> None:
        layer = self.layer_of.get(key)
        if layer is None or key not in self.pending[layer]:
            return
        self.pending[layer].discard(key)
        if not self.pending[layer]:
            self._quantize(layer)

    def _quantize(self, layer: int) -> None:
        parts = self.experts.layers[layer]
        for name in ("w13", "w2"):
            wide = parts[name]  # [E, R, C] in the compute dtype
            if self.scheme == "fp8":
                quantized, scales = self._fp8(wide)
            elif self.scheme == "int4":
                quantized, scales, parts[name + "_zero"] = self._int4(wide)
            else:
                quantized, scales = self._mxfp4(wide)
            parts[name], parts[name + "_scale"] = quantized, scales
            wide.untyped_storage().resize_(0)  # frees it: the loader's views of it are done

    def _fp8(self, wide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> FP8 [E, R, C], float32 scales [E, ceil(R/b0), ceil(C/b1)]."""
        quantized = torch.empty(wide.shape, dtype=FP8)
        scales = []
        for e in range(wide.shape[0]):
            quantized[e], scale = quantize_blocks(wide[e], self.block)
            scales.append(scale)
        return quantized, torch.stack(scales)

    def _mxfp4(self, wide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> blocks [E, R, C/32, 16], scales [E, R, C/32], both uint8."""
        experts, rows, cols = wide.shape
        blocks = torch.empty(
            experts, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK // 2, dtype=torch.uint8
        )
        scales = torch.empty(experts, rows, cols // MXFP4_BLOCK, dtype=torch.uint8)
        for e in range(experts):
            for lo in range(0, rows, ROWS):
                blocks[e, lo : lo + ROWS], scales[e, lo : lo + ROWS] = quantize_mxfp4(
                    wide[e, lo : lo + ROWS]
                )
        return blocks, scales

    def _int4(self, wide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> packed [E, R, C/2] uint8, float16 scales and uint8 zero points [E, R, C/group]."""
        experts, rows, cols = wide.shape
        groups = cols // self.group
        packed = torch.empty(experts, rows, cols // 2, dtype=torch.uint8)
        scales = torch.empty(experts, rows, groups, dtype=torch.float16)
        zeros = torch.empty(experts, rows, groups, dtype=torch.uint8)
        for e in range(experts):
            for lo in range(0, rows, ROWS):
                rows_of = slice(lo, lo + ROWS)
                packed[e, rows_of], scales[e, rows_of], zeros[e, rows_of] = quantize_int4(
                    wide[e, rows_of], self.group
                )
        return packed, scales, zeros
