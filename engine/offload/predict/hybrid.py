"""EF-25's hybrid cross-layer predictor: correct the pre-gate guess for a later layer with what the
pre-gate cannot see, the token's identity and the experts it actually took at the current layer.

For source layer i and target j > i, the features are the pre-gate probabilities for j (the router
of j applied to the residual after i), the multi-hot of i's actual top-k, a learned token embedding
and learned embeddings of i and of the distance j - i (the residual drifts more the further j is).
A small MLP maps them to E logits, added to a learned per-distance multiple of the pre-gate
log-probabilities, so training starts from the pre-gate and learns the correction. EF-25 used a
random forest; an MLP is as cheap at run time and trains with the same BCE loss as the RPP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.models.model import MoECausalLM
from engine.offload.predict.pregate import PreGatePredictor
from engine.offload.predict.rpp import PredictorNet, TokenEmbedding

MIN_PROB = 1e-6  # floor of the pre-gate probabilities before their log


@dataclass(frozen=True)
class HybridConfig:
    num_layers: int  # MoE layers
    num_experts: int
    top_k: int
    vocab_size: int
    num_rows: int  # token embedding rows
    embed_dim: int
    layer_dim: int
    hidden_dim: int


class HybridNet(PredictorNet):
    kind = "hybrid"
    config_type = HybridConfig

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, pairs = cfg.num_experts, max(1, cfg.num_layers - 1)
        self.tokens = TokenEmbedding(cfg.vocab_size, cfg.num_rows, cfg.embed_dim)
        self.source = nn.Embedding(pairs, cfg.layer_dim)
        self.distance = nn.Embedding(pairs, cfg.layer_dim)
        self.gain = nn.Parameter(torch.ones(pairs))  # per distance, on the pre-gate log-probs
        self.mlp = nn.Sequential(
            nn.Linear(2 * E + cfg.embed_dim + cfg.layer_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Linear(cfg.hidden_dim, E),
        )

    def forward(
        self,
        pregate: torch.Tensor,
        routed: torch.Tensor,
        token_ids: torch.Tensor,
        source: torch.Tensor,
        distance: torch.Tensor,
    ) -> torch.Tensor:
        """pregate [B, E] probabilities for the target layer, routed [B, E] multi-hot of the source
        layer's top-k, token_ids/source/distance [B] -> target logits [B, E]."""
        layer = self.source(source) + self.distance(distance - 1)  # [B, Dl]
        x = torch.cat([pregate, routed, self.tokens(token_ids), layer], dim=1)
        prior = self.gain[distance - 1, None] * pregate.clamp_min(MIN_PROB).log()  # [B, E]
        return self.mlp(x) + prior

    @torch.no_grad()
    def correct(
        self, moe_index: int, pregate: torch.Tensor, token_ids: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """pregate [h, T, E] guesses for layers moe_index+1.., token_ids [T], topk_ids [T, k] of
        layer moe_index -> corrected probabilities [h, T, E]. The runtime passes live pre-gate
        probabilities, evaluation the traced ones (the same numbers)."""
        h, T, E = pregate.shape
        if h == 0:
            return pregate
        routed = torch.zeros(T, E, device=pregate.device).scatter_(1, topk_ids.long(), 1.0)
        distance = torch.arange(1, h + 1, device=pregate.device).repeat_interleave(T)  # [h*T]
        logits = self(
            pregate.reshape(h * T, E).float(),
            routed.repeat(h, 1),
            token_ids.long().repeat(h),
            torch.full_like(distance, moe_index),
            distance,
        )
        return torch.sigmoid(logits).view(h, T, E)


class HybridPredictor:
    """Pre-gate guesses for the layers ahead, corrected by the trained `HybridNet`."""

    kind = "hybrid"
    context_window = 0

    def __init__(self, model: MoECausalLM, net: HybridNet) -> None:
        self.pregate = PreGatePredictor(model)
        self.net = net.eval()

    def path(self, token_ids: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
        return None

    def ahead(
        self,
        moe_index: int,
        residual: torch.Tensor,
        token_ids: torch.Tensor,
        topk_ids: torch.Tensor,
        horizon: int,
    ) -> torch.Tensor:
        guess = self.pregate.ahead(moe_index, residual, token_ids, topk_ids, horizon)  # [h, T, E]
        return self.net.correct(moe_index, guess, token_ids, topk_ids)
