"""Routers: which experts each token takes, and with what weight.

Most families take the softmax top-k. DeepSeek adds two things: V2 may first keep only the best
`topk_group` of `num_groups` expert groups (`group_limited_greedy`), and V3 scores experts with a
sigmoid, picks by score plus a learned correction bias inside the best groups (`noaux_tc`) and
weights by the uncorrected score; both scale the weights by `routed_scaling_factor`. The weighting
is a free function so that opt-in cache-aware routing can re-weigh the experts it swapped in.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.family_config import RouterConfig


def router_scores(logits: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """logits [T, E] -> float32 scores [T, E]: softmax probabilities or sigmoid scores."""
    logits = logits.float()
    return logits.sigmoid() if cfg.scoring == "sigmoid" else logits.softmax(dim=-1)


def route_weights(logits: torch.Tensor, ids: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """The float32 weights [T, k] of experts `ids` [T, k] under the router's scoring."""
    weights = router_scores(logits, cfg).gather(1, ids)
    if cfg.normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.scaling if cfg.scaling != 1.0 else weights


class Router(nn.Module):
    """`weight` is [E, H] as on the hub; `e_score_correction_bias` [E] exists for `noaux_tc` only,
    `bias` [E] (added to the logits) for gpt-oss only."""

    def __init__(self, cfg: RouterConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        if cfg.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if cfg.bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> router logits [T, E], weights [T, k] in x's dtype, expert ids [T, k]."""
        cfg = self.cfg
        if cfg.float32_logits:
            bias = None if self.bias is None else self.bias.float()
            logits = nn.functional.linear(x.float(), self.weight.float(), bias)  # [T, E]
        else:
            logits = nn.functional.linear(x, self.weight, self.bias)  # [T, E]
        if cfg.topk_method == "greedy" and cfg.scoring == "softmax":  # the common case, fused
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, ids = torch.topk(probs, cfg.top_k, dim=-1)  # [T, k]
            if cfg.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, (weights * cfg.scaling).to(x.dtype), ids
        ids = torch.topk(self._choice(logits), cfg.top_k, dim=-1).indices  # [T, k]
        return logits, route_weights(logits, ids, cfg).to(x.dtype), ids

    def _choice(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [T, E] -> float32 [T, E]: what the router takes the top-k of, -inf outside each
        token's best groups."""
        if self.cfg.topk_method == "greedy" and not self.cfg.correction_bias:
            return logits.float()  # a sigmoid ranks as its logit: no ties where it rounds to 1
        choice = router_scores(logits, self.cfg)  # [T, E]
        if self.cfg.correction_bias:
            choice = choice + self.e_score_correction_bias
        return choice if self.cfg.topk_method == "greedy" else self._best_groups(choice)

    def ranking(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] -> (key, unit), float32 [T, E]: the key orders experts as the router
        picks them, -inf where it may not pick (outside a token's best groups); `unit` is how much
        the key moves per router-logit unit, so a margin in logits is `margin * unit` in keys.
        Cache-aware routing swaps experts by them."""
        unit = torch.ones_like(logits, dtype=torch.float32)
        if self.cfg.topk_method == "greedy" and not self.cfg.correction_bias:
            return logits.float(), unit  # softmax and sigmoid both rank by the logit itself
        choice = self._choice(logits)  # -inf outside the best groups
        if self.cfg.scoring == "softmax" and not self.cfg.correction_bias:  # log-probabilities
            key = torch.where(  # differ as the logits do
                torch.isfinite(choice), torch.log_softmax(logits.float(), -1), -torch.inf
            )
        else:  # a corrected score s(l) + bias moves by about s(l) (1 - s(l)) per logit unit
            key = choice
            scores = router_scores(logits, self.cfg)
            unit = scores * (1 - scores)
        return key, unit

    def _best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask [T, E] scores outside each token's `topk_groups` best groups. A group is ranked by
        its best score (V2) or by the sum of its two best (V3)."""
        cfg = self.cfg
        grouped = choice.view(choice.shape[0], cfg.num_groups, -1)  # [T, G, E/G]
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        best = torch.topk(group_scores, cfg.topk_groups, dim=-1).indices  # [T, g]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        masked = grouped.masked_fill(~keep[:, :, None], float("-inf"))
        return masked.view_as(choice)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [T, E] -> float32 [T, E] summing to 1, ranked as the router picks (before any
        group limit): what predictors and traces learn from."""
        return routing_probabilities(
            logits, self.cfg, getattr(self, "e_score_correction_bias", None)
        )


def routing_probabilities(
    logits: torch.Tensor, cfg: RouterConfig, correction: torch.Tensor | None
) -> torch.Tensor:
    """`Router.probabilities` for logits [..., E] of one or several layers (`correction`: their
    `e_score_correction_bias`, broadcast against the logits, for the routers that have one)."""
    scores = router_scores(logits, cfg)
    if cfg.correction_bias:  # V3's sigmoid, ERNIE 4.5's softmax: ranked with the bias
        assert correction is not None
        scores = (scores + correction).clamp_min(0)
    elif cfg.scoring == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
