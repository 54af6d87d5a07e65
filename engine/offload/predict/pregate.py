"""Pre-gate prediction (Pre-gated MoE, EF-25's baseline): apply the routers of the layers ahead to the
residual stream as it is now. No training; recall falls with distance as the residual drifts."""

from __future__ import annotations

import torch

from engine.models.layers import MoEBlock
from engine.models.model import MoECausalLM


class PreGatePredictor:
    kind = "pregate"
    context_window = 0

    def __init__(self, model: MoECausalLM) -> None:
        layers = model.model.layers
        self.norms = [layers[i].post_attention_layernorm for i in model.cfg.moe_layers]
        self.routers = [
            layers[i].ffn.gate for i in model.cfg.moe_layers if isinstance(layers[i].ffn, MoEBlock)
        ]

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def path(self, token_ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
        return None

    @torch.no_grad()
    def ahead(
        self,
        moe_index: int,
        residual: torch.Tensor,
        token_ids: torch.Tensor,
        topk_ids: torch.Tensor,
        horizon: int,
    ) -> torch.Tensor:
        targets = range(moe_index + 1, min(moe_index + 1 + horizon, self.num_layers))
        probs = [
            self.routers[j].probabilities(self.routers[j](self.norms[j](residual))[0])
            for j in targets
        ]  # each [T, E]
        if not probs:
            return residual.new_zeros(
                (0, residual.shape[0], self.routers[0].weight.shape[0]), dtype=torch.float32
            )
        return torch.stack(probs)  # [h, T, E]
