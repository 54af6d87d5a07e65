"""Per-sequence routes for the token scheduler: each sequence's next-token route as a layer x expert
bitmap, predicted by the routing predictor when it can predict before layer 0 (rpp), else the route
its last token actually took (consecutive tokens of a sequence share many experts)."""

from __future__ import annotations

import torch

from engine.offload.predict.base import RoutingPredictor


class RouteTracker:
    """A `RoutingObserver` keeping each step's top-k per layer, folded into per-sequence routes."""

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, top_k: int) -> None:
        self.index_of = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts, self.top_k = num_experts, top_k
        self.step_topk: list[torch.Tensor | None] = [None] * len(moe_layers)
        self.last_route: dict[int, torch.Tensor] = {}  # seq id -> bool [L, E]

    def on_route(
        self,
        layer: int,
        residual: torch.Tensor,
        router_logits: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> None:
        self.step_topk[self.index_of[layer]] = topk_ids

    def record(self, seq_ids: list[int], rows: list[int]) -> None:
        """After a step: row `rows[i]` of the flattened batch was sequence `seq_ids[i]`'s last token."""
        if not rows or any(t is None for t in self.step_topk):
            return
        index = torch.tensor(rows)
        routes = torch.zeros(len(rows), len(self.step_topk), self.num_experts, dtype=torch.bool)
        for i, topk in enumerate(self.step_topk):
            assert topk is not None
            routes[:, i].scatter_(1, topk[index.to(topk.device)].cpu(), True)
        for seq_id, route in zip(seq_ids, routes, strict=True):
            self.last_route[seq_id] = route
        self.step_topk = [None] * len(self.step_topk)

    def forget(self, seq_id: int) -> None:
        self.last_route.pop(seq_id, None)

    def routes(
        self,
        seq_ids: list[int],
        predictor: RoutingPredictor | None,
        last_tokens: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """bool [N, L, E]: predicted next-token routes when the predictor has a path, else last routes."""
        if predictor is not None:
            path = predictor.path(last_tokens, context)  # [L, N, E] or None
            if path is not None:
                top = path.topk(self.top_k, dim=-1).indices  # [L, N, k]
                bitmap = torch.zeros_like(path, dtype=torch.bool).scatter_(-1, top, True)
                return bitmap.permute(1, 0, 2).cpu()
        empty = torch.zeros(len(self.step_topk), self.num_experts, dtype=torch.bool)
        return torch.stack([self.last_route.get(s, empty) for s in seq_ids])
