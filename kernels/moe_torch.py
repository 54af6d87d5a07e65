"""Pure-torch fused MoE: the CPU serving hot path, same signature and results as the Triton path.

Pairs (token, k) are sorted by slot once and their inputs gathered once; each slot actually used
runs its two dense GEMMs on its run of rows (a loop over distinct slots, never over tokens), while
the activation, the routing weights and the scatter-add into the output run once over all pairs:
at decode sizes per-op overhead, not FLOPs, is the cost. Half-precision inputs accumulate in
float32 and round once at the end.
"""

from __future__ import annotations

import torch

from kernels.gating import SILU, Gating
from kernels.int4 import dequantize_int4
from kernels.mxfp4 import dequantize_mxfp4


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    gating: Gating = SILU,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    zeros: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write sum_k topk_weights * expert_slot(hidden) into out [T, H] and return it. With
    `scales` (w13's and w2's), the weights are MXFP4 blocks, or with `zeros` too grouped 4-bit
    integers (kernels/int4.py): each used slot's are decoded once."""
    top_k, inter = topk_ids.shape[1], w13.shape[1] // 2
    sorted_slots, order = topk_ids.reshape(-1).sort(stable=True)  # [P] pairs grouped by slot
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)  # [U]
    tokens = order // top_k  # [P] token of each sorted pair
    acc_dtype = torch.float32
    x = hidden.index_select(0, tokens)  # [P, H] every pair's input, gathered once
    gate_up = x.new_empty(x.shape[0], 2 * inter)  # [P, 2I]
    down = x.new_empty(x.shape)  # [P, H]
    # Only the two GEMMs run per slot; gather, activation, weighting and scatter run once.
    runs, slot_ids = counts.tolist(), slots.tolist()

    def weight(w: torch.Tensor, part: int, slot: int) -> torch.Tensor:
        """Slot `slot` of w13 (part 0) or w2 (part 1), transposed: x @ W.T."""
        if scales is None:
            return w[slot].T
        if zeros is not None:
            return dequantize_int4(w[slot], scales[part][slot], zeros[part][slot], x.dtype).T
        return dequantize_mxfp4(w[slot], scales[part][slot], x.dtype).T

    for slot, rows, dest in zip(slot_ids, x.split(runs), gate_up.split(runs), strict=True):
        torch.mm(rows, weight(w13, 0, slot), out=dest)
    if b13 is not None:
        gate_up += b13.index_select(0, sorted_slots)  # [P, 2I]
    act = gating(gate_up[:, :inter], gate_up[:, inter:])  # [P, I]
    for slot, rows, dest in zip(slot_ids, act.split(runs), down.split(runs), strict=True):
        torch.mm(rows, weight(w2, 1, slot), out=dest)
    if b2 is not None:
        down += b2.index_select(0, sorted_slots)  # [P, H]
    route_w = topk_weights.reshape(-1)[order].to(acc_dtype)  # [P]
    # Accumulate straight into a float32 out unless it is hidden itself (an in-place call).
    direct = out.dtype == acc_dtype and out.data_ptr() != hidden.data_ptr()
    acc = out.zero_() if direct else out.new_zeros(out.shape, dtype=acc_dtype)  # [T, H]
    acc.index_add_(0, tokens, down.to(acc_dtype).mul_(route_w[:, None]))
    if acc is not out:
        out.copy_(acc)
    return out
