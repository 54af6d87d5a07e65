"""ExpertStore: the host tier. Every routed expert's weights, loaded once, pinned when CUDA is used."""

from __future__ import annotations

import torch

from engine.loader import HostExperts


class ExpertStore:
    def __init__(self, host: HostExperts, pin: bool) -> None:
        self.layers = tuple(sorted(host.w13))
        self.w13 = {l: (w.pin_memory() if pin else w) for l, w in host.w13.items()}  # [E, 2I, H]  # noqa: E741
        self.w2 = {l: (w.pin_memory() if pin else w) for l, w in host.w2.items()}  # [E, H, I]  # noqa: E741
        first = self.w13[self.layers[0]]
        self.num_experts = first.shape[0]
        self.w13_shape, self.w2_shape = (
            tuple(first.shape[1:]),
            tuple(self.w2[self.layers[0]].shape[1:]),
        )
        self.dtype = first.dtype
        self.expert_bytes = (
            first[0].numel() + self.w2[self.layers[0]][0].numel()
        ) * first.element_size()

    @property
    def num_total_experts(self) -> int:
        return len(self.layers) * self.num_experts

    @property
    def total_bytes(self) -> int:
        return self.num_total_experts * self.expert_bytes

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host views of one expert: w13 [2I, H], w2 [H, I]."""
        return self.w13[layer][expert], self.w2[layer][expert]
