"""Grouped 4-bit integers, the layout 4-bit routed experts (GPTQ, AWQ, pack-quantized, or
`--expert-quantization int4`) keep in host memory, over the link and, opted in, in the slots: a weight [R, C] is stored as bytes [R, C/2] (two values a byte, the lower nibble first),
with a scale (float16 or bfloat16, as the checkpoint has it) and a uint8 zero point [R, C/g] per
group of g consecutive columns (input channels); a value is (q - zero) * scale. 4.2 bits a value
at g = 128: a quarter of bfloat16's bytes to hold and to copy. It is neither checkpoint's layout
(both pack eight values into an int32, along different axes): the loader repacks each expert
once, row-major like the slots, so that decoding one expert as it lands is two shifts, a
subtraction and a multiply. `quantize_int4` rounds a float checkpoint's experts to it.
"""

from __future__ import annotations

import torch


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[..., C] integers in 0..15 (C even) -> [..., C/2] uint8, the even columns in the lower
    nibbles."""
    pairs = values.to(torch.uint8).unflatten(-1, (-1, 2))  # [..., C/2, 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """packed [..., R, C/2] uint8, scales [..., R, G] (any float), zeros [..., R, G] uint8 ->
    [..., R, C] in `dtype`, computed in float32 (as the loader dequantizes GPTQ and AWQ weights
    it does not keep packed, so both give the same values), on their device."""
    q = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)  # [..., R, C]
    groups = scales.shape[-1]
    q = q.unflatten(-1, (groups, -1)).float()  # [..., R, G, g]
    values = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return values.flatten(-2).to(dtype)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., R, C] (C a multiple of `group`) -> packed [..., R, C/2] uint8, float16 scales and
    uint8 zero points [..., R, C/group]: each group's range [min, max] (widened to hold 0) in 15
    steps, each value rounded to the nearest (round-to-nearest, as GPTQ and AWQ start from)."""
    groups = w.float().unflatten(-1, (-1, group))  # [..., R, G, g]
    lo = groups.amin(dim=-1).clamp(max=0)  # [..., R, G]
    hi = groups.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float16).tiny).half()
    zeros = torch.round(-lo / scales.float()).clamp(0, 15)
    q = torch.round(groups / scales.float()[..., None]) + zeros[..., None]
    return pack_int4(q.clamp(0, 15).flatten(-2)), scales, zeros.to(torch.uint8)
