"""The (token, k) pairs of a fused MoE call sorted by slot, each slot's run padded to the kernel's
M tile, so every tile reads one slot's weights (kernels/moe_triton.py)."""

from __future__ import annotations

import torch


def align_by_slot(
    topk_ids: torch.Tensor, block_m: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, k) pairs by slot, padding each slot's run to a multiple of block_m.

    Returns sorted_ids [max_padded] (pair index t*k+j, pad = T*k), block_slots [max_padded/block_m]
    (the slot of each M tile) and num_padded [1] (used length). All on device, no host sync: the
    launch grid uses the bound max_padded and tiles past num_padded exit at once.
    """
    flat = topk_ids.reshape(-1).long()  # [P]
    num_pairs, device = flat.numel(), flat.device
    max_padded = num_pairs + min(num_pairs, num_slots) * (block_m - 1)
    counts = torch.zeros(num_slots, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [S]
    padded = (counts + block_m - 1) // block_m * block_m  # [S]
    padded_end = padded.cumsum(0)  # [S]
    sorted_slot, order = flat.sort(stable=True)  # [P]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_slot]
    pos = (padded_end - padded)[sorted_slot] + rank  # [P] row of each sorted pair
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[pos] = order.to(torch.int32)
    tile_start = torch.arange(0, max_padded, block_m, device=device)  # [max_padded / block_m]
    block_slots = torch.searchsorted(padded_end, tile_start, right=True)
    return sorted_ids, block_slots.clamp_(max=num_slots - 1).to(torch.int32), padded_end[-1:]
