"""All routed experts resident on the device: the reference that offloading must reproduce exactly."""

from __future__ import annotations

import torch

import kernels
from engine.loader import HostExperts


class ResidentExperts:
    """`RoutedExperts` with every expert in device memory; expert ids are used directly as slot ids."""

    def __init__(self, host: HostExperts, device: torch.device | str) -> None:
        self.w13 = {layer: w.to(device) for layer, w in host.w13.items()}  # layer -> [E, 2I, H]
        self.w2 = {layer: w.to(device) for layer, w in host.w2.items()}  # layer -> [E, H, I]

    def __call__(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return kernels.fused_moe(hidden, self.w13[layer], self.w2[layer], topk_weights, topk_ids)
