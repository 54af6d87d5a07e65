"""Prefetcher: turns routing predictions into low-priority copies for the layers ahead.

It watches each MoE layer's routing (a `RoutingObserver`). Before layer 0 it asks the predictor for the
whole path (rpp); after each layer's router it asks for the next S layers (pregate, hybrid, or the
rpp's stored path) and prefetches each token's predicted top-k experts there, while the current
layer's experts compute. It also scores itself: recall of the one-layer-ahead prediction, stalls and
wasted prefetches feed the adaptive horizon (EF-25) and the `expertflow` policy's demotions (EF-24).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

import torch

from engine.offload.cache import ExpertCache
from engine.offload.experts import DistinctExperts
from engine.offload.horizon import HorizonController
from engine.offload.policy import ExpertFlowPolicy, Key
from engine.offload.predict.base import RoutingPredictor


@dataclass(frozen=True)
class _Ranked:
    """Layers ahead as `Prefetcher._ranked` ranks them: each layer's experts, best first; each
    token's top-k ids [h, T, k]; and, made only when asked (an idle link's extra guess), the
    same rankings one expert deeper."""

    rankings: list[list[int]]
    top_ids: torch.Tensor
    deeper: Callable[[], list[list[int]]]

    def slice(self, start: int, count: int) -> _Ranked:
        """Layers start .. start + count - 1 (fewer at the path's end)."""
        stop, deeper = start + count, self.deeper
        return _Ranked(
            self.rankings[start:stop], self.top_ids[start:stop], lambda: deeper()[start:stop]
        )


class Prefetcher:
    def __init__(
        self,
        predictor: RoutingPredictor,
        cache: ExpertCache,
        moe_layers: tuple[int, ...],
        horizon: HorizonController,
        top_k: int,
        clock: Callable[[], float] = time.perf_counter,
        distinct: DistinctExperts | None = None,
    ) -> None:
        """`distinct`: the experts' own reader of a layer's expert ids, so both share one read-back."""
        self.predictor, self.cache, self.horizon, self.clock = predictor, cache, horizon, clock
        self.distinct = distinct or DistinctExperts()
        self.moe_layers, self.top_k = moe_layers, top_k
        self.index_of = {layer: i for i, layer in enumerate(moe_layers)}
        self.token_ids = torch.empty(0, dtype=torch.long)
        self.predicted: dict[int, set[int]] = {}  # moe index -> experts prefetched/predicted for it
        self.next_layer_topk: torch.Tensor | None = None  # [T, k] one-layer-ahead predicted ids
        # summed where the routing is, read back only with the stats: scoring every layer must
        # not cost a GPU sync
        self.recall_sum: torch.Tensor | float = 0.0
        self.recall_count = 0
        self.predicted_count, self.predicted_used = 0, 0  # for the precision of what we fetch
        self.current_horizon = horizon.horizon(top_k)
        self._layer_start_s = self._stall_at_start_s = 0.0
        self._late_seen = 0
        self._path: _Ranked | None = None  # this step's whole path, ranked (a path predictor)

    @property
    def recall(self) -> float:
        """Mean recall@k of the one-layer-ahead prediction so far."""
        return float(self.recall_sum) / self.recall_count if self.recall_count else 0.0

    @property
    def precision(self) -> float:
        """Share of the experts predicted for a layer that it used, so far (1 before any)."""
        return self.predicted_used / self.predicted_count if self.predicted_count else 1.0

    def begin_step(self, token_ids: torch.Tensor, context: torch.Tensor) -> None:
        """token_ids [T], context [T, W]: before layer 0 of a step. A whole path (rpp) is ranked
        here once: the layers ahead of each layer are slices of it, and ranking them again after
        every layer cost more than the rest of the layer's prefetching."""
        self.token_ids = token_ids
        self.predicted, self.next_layer_topk, self._path = {}, None, None
        path = self.predictor.path(token_ids, context)  # [L, T, E] or None
        if path is not None:
            rankings, top_ids = self._ranked(path)
            deeper = functools.cache(lambda: self._ranked(path, self.top_k + 1)[0])
            self._path = _Ranked(rankings, top_ids, deeper)
            self._prefetch(self._path.slice(0, self.current_horizon), first_index=0)
            self.next_layer_topk = top_ids[0]  # scored at layer 0, whatever the horizon
        self._layer_start_s = self.clock()
        self._stall_at_start_s = self.cache.transfers.resolve_stalls()

    def on_route(
        self,
        layer: int,
        residual: torch.Tensor,
        router_logits: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> None:
        index = self.index_of[layer]
        now, stall_s = self.clock(), self.cache.transfers.resolve_stalls()
        if index > 0:
            # Compute time only: a stall inside the layer says nothing about how long layers run
            # (counting it would make copies look cheap exactly when they are not).
            self.horizon.observe_layer_time(
                now - self._layer_start_s - (stall_s - self._stall_at_start_s)
            )
        self._layer_start_s, self._stall_at_start_s = now, stall_s
        distinct = self.distinct(topk_ids)
        self._score(index, topk_ids, distinct)
        self._measure_bandwidth()
        self.current_horizon = self.horizon.horizon(len(distinct))
        if self._path is not None:  # a path predictor's layers ahead are its path's
            ahead = self._path.slice(index + 1, self.current_horizon)
        else:
            ahead = self._rank_ahead(
                self.predictor.ahead(
                    index, residual, self.token_ids, topk_ids, self.current_horizon
                )
            )
        self.next_layer_topk = None  # until the ranking of the layers ahead sets it
        in_use = frozenset((layer, e) for e in distinct)  # this layer's, about to run
        self._prefetch(ahead, first_index=index + 1, in_use=in_use)

    def _prefetch(
        self, ahead: _Ranked, first_index: int, in_use: frozenset[Key] = frozenset()
    ) -> None:
        """`ahead` ranks MoE layers first_index.. : protect and prefetch the likeliest experts,
        nearest layer first, until the protected tier holds half the slots (EF-25's high tier; the
        rest follows the policy, so far, unsure guesses never crowd out what is actually reused).
        An idle link that lands a copy within a layer also takes one guess beyond the top-k for
        the next layer. `in_use` holds experts to protect first (the current layer's, about to
        run)."""
        room = self.cache.num_slots // 2  # the layer running now is pinned anyway
        protected, wanted = set(in_use), []
        rankings = ahead.rankings
        if rankings:  # each token's predicted top-k for the next layer, scored when it runs
            self.next_layer_topk = ahead.top_ids[0]
        for s, ranked in enumerate(rankings):
            index, layer = first_index + s, self.moe_layers[first_index + s]
            experts = ranked[:room]
            if not experts:
                break
            room -= len(experts)
            self.predicted[index] = set(experts)
            protected.update(zip(repeat(layer), experts))
            wanted.append((layer, experts))
        self.cache.protected = protected
        if isinstance(self.cache.policy, ExpertFlowPolicy):
            self.cache.policy.predict(frozenset(protected))
        outstanding = self.cache.outstanding_prefetches() if wanted else 0
        for distance, (layer, experts) in enumerate(wanted, start=1):
            if not self.horizon.pays(distance, self.precision):
                continue  # a wrong guess would cost the link more than a right one saves
            budget = self.horizon.link_budget(distance)
            room = None if budget is None else budget - outstanding
            if room is None or room > 0:
                outstanding += self.cache.prefetch(layer, experts, room)
        # Nothing waits behind such a guess, and it lands before the next layer's lookups: on the
        # demo model (1x link) it cut misses by 10-25% and stall by a third or more.
        if wanted and (self.horizon.copies_within(1) or 0) >= 1 and not self.cache.copying():
            layer, deeper = wanted[0][0], ahead.deeper()
            self.cache.prefetch(layer, [e for e in deeper[0] if e not in wanted[0][1]][:1], 1)

    def _rank_ahead(self, probs: torch.Tensor) -> _Ranked:
        """probs [h, T, E] for the layers ahead, ranked (one layer deeper only for the first,
        the only one an extra guess goes to)."""
        rankings, top_ids = self._ranked(probs)
        return _Ranked(rankings, top_ids, lambda: self._ranked(probs[:1], self.top_k + 1)[0])

    def _ranked(
        self, probs: torch.Tensor, depth: int | None = None
    ) -> tuple[list[list[int]], torch.Tensor]:
        """probs [h, T, E] -> for each layer ahead, the union of each token's top-k (or
        top-`depth`) experts by summed probability, highest first (ties: lowest id first), and
        each token's top ids [h, T, k]. Sorted where the tensors are and read back once: the
        horizon may reach dozens of layers."""
        h, tokens, num_experts = probs.shape
        k = min(depth or self.top_k, num_experts)
        top = probs.topk(k, dim=-1)  # [h, T, k]
        mass = torch.zeros(h, num_experts, device=probs.device)  # [h, E]
        mass.scatter_add_(1, top.indices.flatten(1), top.values.flatten(1).float())
        width = min(num_experts, tokens * k)  # no layer has more experts with mass
        order = mass.argsort(dim=1, descending=True, stable=True)[:, :width]  # [h, width]
        flat = torch.cat((mass.count_nonzero(dim=1), order.flatten())).tolist()
        ranked = [flat[h + i * width : h + i * width + n] for i, n in enumerate(flat[:h])]
        return ranked, top.indices

    def _score(self, index: int, topk_ids: torch.Tensor, distinct: list[int]) -> None:
        """Compare what was predicted for this layer with its actual routing (`distinct`: the
        experts it uses)."""
        predicted_ids = self.next_layer_topk
        if predicted_ids is not None and predicted_ids.shape == topk_ids.shape:
            predicted_ids = predicted_ids.to(topk_ids.device)  # a predictor may run elsewhere
            found = (predicted_ids[:, :, None] == topk_ids[:, None, :]).any(dim=1)  # [T, k]
            if not isinstance(self.recall_sum, torch.Tensor):
                # float64: a server scores millions of layers, past float32's integer precision
                self.recall_sum = torch.zeros((), dtype=torch.float64, device=found.device)
            self.recall_sum.add_(found.sum(), alpha=1 / found.numel())  # this layer's recall@k
            self.recall_count += 1
        predicted = self.predicted.pop(index, None)
        # A stall on a prefetch still in flight says "look further ahead"; a stall on an expert
        # nobody predicted does not (a longer horizon only adds less accurate guesses).
        late = self.cache.stats.prefetch_late
        stalled, self._late_seen = late > self._late_seen, late
        overfetched = False
        if predicted is not None:
            used = set(distinct)
            unused = predicted - used
            self.predicted_count += len(predicted)
            self.predicted_used += len(predicted & used)
            overfetched = len(unused) > len(predicted & used)
            if isinstance(self.cache.policy, ExpertFlowPolicy):
                layer = self.moe_layers[index]
                for e in unused:  # only what we copied in: others keep their frequency rank
                    if (layer, e) in self.cache.prefetched:
                        self.cache.policy.demote((layer, e))
        self.horizon.observe_layer(stalled, overfetched)

    def _measure_bandwidth(self) -> None:
        while self.cache.completed:
            transfer = self.cache.completed.popleft()
            seconds = self.cache.transfers.measured_duration(transfer)
            if seconds:
                self.horizon.observe_transfer(transfer.nbytes, seconds)
