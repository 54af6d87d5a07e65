"""ExpertStore: the host tier. Every routed expert's weights, loaded once, pinned when CUDA is used.
FP8, MXFP4 and 4-bit integer experts (a quantized release's, or `--expert-quantization`'s) stay
so here, with their scales, and cross the link so."""

from __future__ import annotations

import math

import torch

from engine.host_experts import HostExperts
from kernels.fp8 import dequantize_blocks
from kernels.int4 import dequantize_int4
from kernels.mxfp4 import dequantize_mxfp4


class ExpertStore:
    def __init__(self, host: HostExperts, pin: bool, packed_slots: bool = False) -> None:
        """`packed_slots`: MXFP4 or 4-bit experts stay packed in their slots too (the kernel
        decodes)."""
        self.layers = tuple(sorted(host.layers))
        # layer -> part name -> [E, ...] (see HostExperts)
        self.parts = {
            layer: {name: t.pin_memory() if pin else t for name, t in host.parts(layer).items()}
            for layer in self.layers
        }
        first = self.parts[self.layers[0]]
        self.num_experts = first["w13"].shape[0]
        self.packed = packed_slots and (host.mxfp4 or host.int4_group is not None)
        self.slot_shapes = host.slot_shapes  # part name -> one expert's decoded shape
        # part name -> (shape, dtype) of one expert in a slot: decoded, or as stored when packed
        self.slot_layout = {
            name: (self.slot_shapes[name], host.compute_dtype) for name in self.slot_shapes
        }
        if self.packed:
            self.slot_layout = {name: (t.shape[1:], t.dtype) for name, t in first.items()}
        self.mxfp4 = host.mxfp4  # MXFP4 blocks and scales (gpt-oss)
        self.fp8_block = host.fp8_block  # None: the experts are stored in the compute dtype
        self.int4_group = host.int4_group  # GPTQ's or AWQ's grouped 4-bit integers
        self.dtype = host.compute_dtype  # what the slots hold and the kernel reads
        self.expert_bytes = host.expert_bytes  # what one copy moves

    @property
    def num_total_experts(self) -> int:
        return len(self.layers) * self.num_experts

    @property
    def decoded_expert_bytes(self) -> int:
        """What one expert takes decoded in a slot (its parts in the compute dtype)."""
        itemsize = self.dtype.itemsize
        return sum(math.prod(shape) * itemsize for shape in self.slot_shapes.values())

    @property
    def total_bytes(self) -> int:
        return self.num_total_experts * self.expert_bytes

    @property
    def quantized(self) -> bool:
        """Whether the stored parts differ from what a slot holds (then `to_slot` them)."""
        packed = self.mxfp4 or self.int4_group is not None
        return self.fp8_block is not None or (packed and not self.packed)

    def to_slot(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's stored parts (on any device) -> what its slot holds."""
        return self.dequantize(parts) if self.quantized else parts

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Host views of one expert's parts, as stored."""
        return {name: t[expert] for name, t in self.parts[layer].items()}

    def dequantize(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's stored parts (on any device) -> what its slot holds, in the compute dtype:
        w13 [2I, H], w2 [H, I] and the biases, when there are."""
        out = {name: parts[name] for name in self.slot_shapes}
        if self.mxfp4:
            for name in ("w13", "w2"):
                out[name] = dequantize_mxfp4(parts[name], parts[name + "_scale"], self.dtype)
        if self.int4_group is not None:
            for name in ("w13", "w2"):
                out[name] = dequantize_int4(
                    parts[name], parts[name + "_scale"], parts[name + "_zero"], self.dtype
                )
        if self.fp8_block is not None:
            for name in ("w13", "w2"):
                out[name] = dequantize_blocks(
                    parts[name], parts[name + "_scale"], self.fp8_block, self.dtype
                )
        return out

    def dequantized(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's slot parts in the compute dtype, on the host (views when stored so)."""
        return self.dequantize(self.expert(layer, expert))
