"""Pre-gate prediction (Pre-gated MoE, EF-25's baseline): apply the routers of the layers ahead to the
residual stream as it is now. No training; recall falls with distance as the residual drifts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.models.layers import MoEBlock
from engine.models.model import MoECausalLM
from engine.models.router import routing_probabilities


class PreGatePredictor:
    """Keeps every MoE layer's router weights and norm scale stacked, so the layers ahead score
    in one batched GEMM instead of a norm, a GEMM and a softmax each: the horizon may reach
    dozens of layers, and on a GPU each op is a launch. The stack holds the routers' weights a
    second time (2 MiB for Mixtral-8x7B and 24 MiB for Qwen3-30B-A3B in bfloat16, 406 MiB for
    DeepSeek-V3, whose routers stay float32), counted before the expert cache is sized to the GPU."""

    kind = "pregate"
    context_window = 0

    def __init__(self, model: MoECausalLM) -> None:
        layers = model.model.layers
        moe = [i for i in model.cfg.moe_layers if isinstance(layers[i].ffn, MoEBlock)]
        self.routers = [layers[i].ffn.gate for i in moe]
        norms = [layers[i].post_attention_layernorm for i in moe]
        self.cfg, self.eps = self.routers[0].cfg, norms[0].eps
        with torch.no_grad():
            self.weights = torch.stack([r.weight for r in self.routers])  # [L, E, H]
            self.scales = torch.stack([n.weight for n in norms])  # [L, H]
            self.biases = (
                torch.stack([r.bias for r in self.routers]) if self.cfg.bias else None
            )  # [L, E]
            self.corrections = (
                torch.stack([r.e_score_correction_bias for r in self.routers])
                if self.cfg.correction_bias
                else None
            )  # [L, E]

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
        """residual [T, H] -> [h, T, E]: each layer ahead's router on its own norm of it."""
        ahead = slice(moe_index + 1, min(moe_index + 1 + horizon, self.num_layers))
        scales, weights = self.scales[ahead], self.weights[ahead]  # [h, H], [h, E, H]
        normed = F.rms_norm(residual.float(), residual.shape[-1:], eps=self.eps)  # [T, H]
        if scales.dtype == torch.float32:  # as RMSNorm scales: before the cast, or after it
            x = (scales[:, None, :] * normed).to(residual.dtype)  # [h, T, H]
        else:
            x = scales[:, None, :] * normed.to(residual.dtype)
        if self.cfg.float32_logits:
            x, weights = x.float(), weights.float()
        if self.biases is None:
            logits = torch.bmm(x, weights.transpose(1, 2))  # [h, T, E]
        else:  # added inside the GEMM, before it rounds, as `F.linear` does
            bias = self.biases[ahead, None, :].to(x.dtype)  # [h, 1, E]
            logits = torch.baddbmm(bias, x, weights.transpose(1, 2))
        correction = None if self.corrections is None else self.corrections[ahead, None, :]
        return routing_probabilities(logits, self.cfg, correction)  # [h, T, E] float32
