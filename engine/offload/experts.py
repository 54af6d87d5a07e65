"""OffloadedExperts: the `RoutedExperts` the model calls, running each layer's experts from cache slots."""

from __future__ import annotations

import torch

import kernels
from engine.offload.cache import ExpertCache


class OffloadedExperts:
    def __init__(self, cache: ExpertCache, num_experts: int) -> None:
        self.cache = cache
        self.num_experts = num_experts
        self.activated_per_step: list[int] = []  # distinct experts summed over layers, per step

    def begin_step(self) -> None:
        self.cache.begin_step()
        self.activated_per_step.append(0)

    def __call__(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, k] expert ids, topk_weights [T, k] -> [T, H]."""
        distinct = topk_ids.unique().tolist()  # the host must know which experts to make resident
        if self.activated_per_step:
            self.activated_per_step[-1] += len(distinct)
        capacity = self.cache.num_slots
        if len(distinct) <= capacity:
            slots = self.cache.ensure(layer, distinct)
            slot_of = torch.zeros(self.num_experts, dtype=torch.long, device=hidden.device)
            slot_of[distinct] = torch.tensor(slots, device=hidden.device)
            out = kernels.fused_moe(
                hidden, self.cache.w13, self.cache.w2, topk_weights, slot_of[topk_ids]
            )
            self.cache.release(slots)
            return out
        # A cache smaller than this layer's working set: stream the experts through it in groups.
        out = torch.zeros_like(hidden)
        for start in range(0, len(distinct), capacity):
            group = distinct[start : start + capacity]
            slots = self.cache.ensure(layer, group)
            slot_of = torch.full(
                (self.num_experts,), slots[0], dtype=torch.long, device=hidden.device
            )
            slot_of[group] = torch.tensor(slots, device=hidden.device)
            in_group = torch.isin(topk_ids, torch.tensor(group, device=hidden.device))
            weights = torch.where(in_group, topk_weights, torch.zeros_like(topk_weights))
            out += kernels.fused_moe(
                hidden, self.cache.w13, self.cache.w2, weights, slot_of[topk_ids]
            )
            self.cache.release(slots)
        return out
