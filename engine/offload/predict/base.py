"""The routing predictor interface: probabilities of each expert being routed, for layers ahead.

Layers are counted in MoE layers (`moe_index` 0..L-1 over ModelConfig.moe_layers). A predictor sees
what is known at two moments of a step: before layer 0 (`path`: token ids and their context) and
after each MoE layer's router (`ahead`: the residual stream and that layer's actual routing).
"""

from __future__ import annotations

from typing import Protocol

import torch


class RoutingPredictor(Protocol):
    kind: str
    context_window: int  # previous token ids `path` wants per token (0: none)

    def path(self, token_ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
        """token_ids [T], context [T, W] (previous ids, -1 = none) -> [L, T, E] for every MoE layer,
        or None if this predictor cannot predict before the first layer. A predictor that gives a
        path predicts the layers ahead from it: the prefetcher then takes the path's slices for
        the rest of the step and does not call `ahead`."""
        ...

    def ahead(
        self,
        moe_index: int,
        residual: torch.Tensor,
        token_ids: torch.Tensor,
        topk_ids: torch.Tensor,
        horizon: int,
    ) -> torch.Tensor:
        """At MoE layer `moe_index`, after its router: residual [T, H], token_ids [T], topk_ids [T, k]
        -> [h, T, E] for MoE layers moe_index+1 .. moe_index+h, h = min(horizon, L-1-moe_index)."""
        ...


def recall_at_k(probs: torch.Tensor, actual: torch.Tensor) -> float:
    """Mean fraction of each token's actual top-k experts found in its predicted top-k.
    probs [T, E], actual [T, k] expert ids."""
    k = actual.shape[-1]
    predicted = probs.topk(k, dim=-1).indices  # [T, k]
    found = (predicted[:, :, None] == actual[:, None, :]).any(dim=1)  # [T, k]
    return found.float().mean().item()
