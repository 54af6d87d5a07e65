"""MXFP4 (OCP microscaling FP4), gpt-oss's expert format: 32 values share one power-of-two scale.

A weight [R, C] is stored as blocks [R, C/32, 16] uint8, two e2m1 values a byte (the lower nibble
first), and scales [R, C/32] uint8 (e8m0: the block's values times 2**(scale - 127)): 4.25 bits a
value, a quarter of bfloat16's bytes to hold and to copy. Decoding is transformers' own
(`convert_moe_packed_tensors`, which gpt-oss's loader there uses), on whatever device the blocks
are on.
"""

from __future__ import annotations

import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

BLOCK = 32  # values per scale


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """blocks [R, C/32, 16] uint8, scales [R, C/32] uint8 -> [R, C] in `dtype` (a transposed view:
    transformers returns the [C, R] layout its experts use)."""
    return convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0].T
