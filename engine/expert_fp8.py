"""`--expert-quantization fp8`: a 16 or 32-bit checkpoint's routed experts become block-wise FP8
on the host as they load, for families with no FP8 release of their own (Llama 4, Mixtral, ...)
and without a converted copy on disk (`expertflow quantize-fp8` cannot convert experts stored a
tensor per layer). They then take half of bfloat16's host memory and link bytes, and are
dequantized as they land in their slots, like an FP8 checkpoint's.

Each MoE layer is quantized as soon as its last expert weight lands and its wide copy freed, so
loading never holds much more than the FP8 experts plus the layers still arriving (Llama 4 Scout:
90 GiB instead of 180)."""

from __future__ import annotations

from collections import Counter

import torch

from engine.host_experts import HostExperts
from kernels.fp8 import FP8, quantize_blocks

BLOCK = (128, 128)  # DeepSeek-V3's and Qwen3-FP8's block


class ExpertQuantizer:
    """Counts the hub weights landing in each MoE layer's experts (`layer_of`: hub key -> layer)
    and quantizes a layer once all of them have."""

    def __init__(
        self, experts: HostExperts, layer_of: dict[str, int], block: tuple[int, int] | None = None
    ) -> None:
        self.experts, self.layer_of, self.block = experts, layer_of, block or BLOCK
        self.remaining = Counter(layer_of.values())
        experts.fp8_block = self.block

    def landed(self, key: str) -> None:
        layer = self.layer_of.get(key)
        if layer is None:
            return
        self.remaining[layer] -= 1
        if self.remaining[layer] == 0:
            self._quantize(layer)

    def _quantize(self, layer: int) -> None:
        parts = self.experts.layers[layer]
        for name in ("w13", "w2"):
            wide = parts[name]  # [E, R, C] in the compute dtype
            quantized = torch.empty(wide.shape, dtype=FP8)
            scales = []
            for e in range(wide.shape[0]):
                quantized[e], scale = quantize_blocks(wide[e], self.block)
                scales.append(scale)  # [ceil(R/b0), ceil(C/b1)]
            parts[name], parts[name + "_scale"] = quantized, torch.stack(scales)
            wide.untyped_storage().resize_(0)  # frees it: the loader's views of it are done
