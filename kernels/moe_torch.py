"""Pure-torch fused MoE: the CPU serving hot path, same signature and results as the Triton path.

Pairs (token, k) are sorted by slot once; each slot actually used runs two dense GEMMs on its
tokens (a loop over distinct slots, never over tokens) and scatter-adds its weighted rows into
the output. Half-precision inputs accumulate in float32 and round once at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write sum_k topk_weights * expert_slot(hidden) into out [T, H] and return it."""
    top_k, inter = topk_ids.shape[1], w2.shape[2]
    sorted_slots, order = topk_ids.reshape(-1).sort(stable=True)  # [P] pairs grouped by slot
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)  # [U]
    tokens = order // top_k  # [P] token of each sorted pair
    # Accumulate straight into a float32 out unless it is hidden itself (an in-place call).
    direct = out.dtype == torch.float32 and out.data_ptr() != hidden.data_ptr()
    acc = out.zero_() if direct else out.new_zeros(out.shape, dtype=torch.float32)  # [T, H]
    route_w = topk_weights.reshape(-1)[order].to(acc.dtype)  # [P]
    start = 0
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
        rows = tokens[start : start + count]  # [c]
        x = hidden.index_select(0, rows)  # [c, H]
        gate_up = x @ w13[slot].T  # [c, 2I]
        act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # [c, I]
        y = (act @ w2[slot].T).to(acc.dtype)  # [c, H]
        acc.index_add_(0, rows, y.mul_(route_w[start : start + count, None]))
        start += count
    if acc is not out:
        out.copy_(acc)
    return out
