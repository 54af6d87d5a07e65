"""The host tier of the expert cache: every routed expert of every MoE layer as the loader
leaves it in host memory, by part, and what one expert takes in a device slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLOT_PARTS = ("w13", "w2", "b13", "b2")  # what a device slot holds, in the compute dtype


@dataclass
class HostExperts:
    """Every routed expert of every MoE layer, by part, expert-major: the host tier of the cache.
    w13 [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up), w2 [E, H, I] and gpt-oss's biases b13 [E, 2I],
    b2 [E, H]. An FP8 checkpoint's w13 and w2 stay FP8, with their block scales w13_scale
    [E, 2I/b0, ceil(H/b1)] and w2_scale [E, ceil(H/b0), ceil(I/b1)] float32, and are dequantized
    as each copy lands in its device slot: half the bytes of bfloat16 to hold and to copy. An
    MXFP4 checkpoint's (gpt-oss) stay MXFP4 likewise, with their scales: a quarter of them; a
    GPTQ, AWQ or pack-quantized checkpoint's 4-bit integers too, two a byte [E, R, C/2] with
    scales (as stored) and uint8 zero points [E, R, C/g] (kernels/int4.py)."""

    layers: dict[int, dict[str, torch.Tensor]]  # layer -> part name -> [E, ...]
    fp8_block: tuple[int, int] | None = None  # (b0, b1) when the experts are FP8
    mxfp4: bool = False  # w13 and w2 are MXFP4 blocks [E, R, C/32, 16] with scales [E, R, C/32]
    int4_group: int | None = None  # w13 and w2 are 4-bit integers in groups of this many columns
    compute_dtype: torch.dtype = torch.float32  # what they compute in (the serving dtype)

    def parts(self, layer: int) -> dict[str, torch.Tensor]:
        return self.layers[layer]

    @property
    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one expert's part in a device slot, for each part a slot holds."""
        first = self.layers[next(iter(self.layers))]
        shapes = {name: tuple(first[name].shape[1:]) for name in SLOT_PARTS if name in first}
        if self.mxfp4:  # [R, C/32, 16] bytes hold [R, C] values
            for name in ("w13", "w2"):
                rows, groups, pairs = shapes[name]
                shapes[name] = (rows, groups * pairs * 2)
        if self.int4_group is not None:  # [R, C/2] bytes hold [R, C] values
            for name in ("w13", "w2"):
                rows, pairs = shapes[name]
                shapes[name] = (rows, pairs * 2)
        return shapes

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all its parts, as stored): what one copy moves."""
        first = self.layers[next(iter(self.layers))]
        return sum(t[0].numel() * t.element_size() for t in first.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.layers.values() for t in p.values())
