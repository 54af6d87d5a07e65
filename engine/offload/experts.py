"""OffloadedExperts: the `RoutedExperts` the model calls, running each layer's experts from cache slots.

Three ways through a layer: all experts resident (one kernel call); `resident_first` (EF-25): the
resident experts compute while the missing ones are still copying, then each missing expert computes
its tokens as its copy lands; and streaming, when a layer needs more experts than the cache has slots.
With `--cpu-expert-compute` a missing expert may instead run on the host (`HostCompute`).
Opt-in cache-aware routing (arXiv 2412.00099) may swap a token's non-resident expert for a resident one
whose router logit is within a margin: the only path that changes outputs.
"""

from __future__ import annotations

import time
from collections import deque

import torch

import kernels
from engine.models.router import Router, route_weights
from engine.offload.cache import ExpertCache
from kernels.gating import SILU, Gating

STEP_HISTORY = 1 << 16  # latest steps `activated_per_step` keeps (a benchmark reads its run's)
SMALL_ROUTING = 256  # (token, k) pairs up to which a layer's distinct experts are found on the host


class DistinctExperts:
    """A layer's distinct expert ids, read back to the host once: the prefetcher (routing observer)
    and the experts both need them, and on a GPU each read-back is a sync. Holding the last ids
    keeps their memory alive, so ids at the same address with as many elements are the same ids,
    or a view of them (Llama 4's [T*k, 1]); nothing writes routing ids in place."""

    def __init__(self) -> None:
        self._ids: torch.Tensor | None = None
        self._distinct: list[int] = []

    def __call__(self, topk_ids: torch.Tensor) -> list[int]:
        last = self._ids
        if last is None or (last.data_ptr(), last.numel()) != (
            topk_ids.data_ptr(),
            topk_ids.numel(),
        ):
            self._ids, self._distinct = topk_ids, _distinct(topk_ids)
        return self._distinct


def to_device(
    values: list[int] | list[bool], device: torch.device, dtype: torch.dtype = torch.long
) -> torch.Tensor:
    """A host list as a tensor on `device`. `torch.tensor(values, device="cuda")` copies from
    pageable memory and synchronizes the stream, and a layer makes a few; from pinned memory the
    copy is queued and the host goes on (torch's pinned-memory cache keeps the buffer until the
    copy has run)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _distinct(ids: torch.Tensor) -> list[int]:
    """Sorted distinct values of `ids`. A decode step's few ids are read back and sorted on the
    host: `unique` sorts through several ops, about 70 us on a CPU for a handful of ids; a
    prefill's thousands it sorts faster."""
    if ids.numel() <= SMALL_ROUTING:
        return sorted(set(ids.flatten().tolist()))
    return ids.unique().tolist()


class OffloadedExperts:
    def __init__(
        self,
        cache: ExpertCache,
        num_experts: int,
        routers: dict[int, Router],
        resident_first: bool = False,
        routing_margin: float = 0.0,
        gating: Gating = SILU,
    ) -> None:
        """`routers`: each MoE layer's router, which cache-aware routing ranks experts by;
        `gating`: the experts' activation."""
        self.cache, self.num_experts, self.routers = cache, num_experts, routers
        self.gating = gating
        self.resident_first, self.routing_margin = resident_first, routing_margin
        # distinct experts summed over layers, per step: a server steps for ever, so the record is
        # bounded and the running totals (read every step by the stats) cover every step
        self.activated_per_step: deque[int] = deque(maxlen=STEP_HISTORY)
        self.activated_total, self.active_steps = 0, 0
        self.rerouted = 0  # (token, k) pairs moved to a resident expert by cache-aware routing
        self.distinct = DistinctExperts()

    def begin_step(self) -> None:
        self.cache.begin_step()
        self.activated_per_step.append(0)

    def __call__(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        router_logits: torch.Tensor,
    ) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, k] expert ids, topk_weights [T, k], router_logits [T, E] -> [T, H]."""
        if self.routing_margin > 0:
            topk_ids, topk_weights = self._prefer_resident(
                layer, topk_ids, router_logits, hidden.dtype
            )
        distinct = self.distinct(topk_ids)  # the host must know which experts to make resident
        if self.activated_per_step:
            self.active_steps += self.activated_per_step[-1] == 0
            self.activated_per_step[-1] += len(distinct)
            self.activated_total += len(distinct)
        on_host = []
        if self.cache.host is not None:  # tokens per expert: the host's cost depends on them
            # one read-back: CUDA's bincount reads its input's min and max back, indexing by a
            # list sends the list over
            ids = topk_ids.flatten()
            counts = torch.zeros(self.num_experts, dtype=ids.dtype, device=ids.device)
            counts = counts.index_add_(0, ids, torch.ones_like(ids)).tolist()
            on_host = self.cache.take_host(layer, distinct, [counts[e] for e in distinct])
        fits = not on_host and len(distinct) <= self.cache.num_slots
        if fits:
            slots, pending = self.cache.acquire(layer, distinct)
            slot_of = self._slot_table(distinct, slots, hidden.device)
            if not self.resident_first or not pending or len(pending) == len(distinct):
                for i in pending:
                    self.cache.wait_ready(slots[i])
                # the common path: one kernel call, rounded once
                out = self.cache.slots.run(hidden, topk_weights, slot_of[topk_ids], self.gating)
                self.cache.release(slots)
                return out
        # Split over several calls (resident-first, streaming, the host): each part is added up
        # in float32 and rounded once, so the split never shows in the output.
        acc = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [T, H]
        if fits:
            self._resident_first(
                hidden, topk_ids, topk_weights, distinct, slots, pending, slot_of, acc
            )
            self.cache.release(slots)
        else:
            self._with_host(layer, hidden, topk_ids, topk_weights, distinct, on_host, acc)
        return acc.to(hidden.dtype)

    def _with_host(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        distinct: list[int],
        on_host: list[int],
        acc: torch.Tensor,
    ) -> None:
        """The host runs `on_host` (none when a layer only outgrows the slots) from its own copy
        of their weights, the device the rest, streamed through the slots; all added into `acc`. The host's inputs leave the device first, so on
        CUDA the device part, queued next, runs while the host computes."""
        host = self.cache.store.parts[layer]["w13"].device
        inputs = []
        for expert in on_host:
            rows, cols = (topk_ids == expert).nonzero(as_tuple=True)  # [n] each
            inputs.append((expert, rows, hidden[rows].to(host), topk_weights[rows, cols].to(host)))
        on_device = [e for e in distinct if e not in on_host]
        if on_device and on_host:  # host pairs weigh 0 here, on an expert the device runs anyway
            is_host = torch.isin(topk_ids, to_device(on_host, hidden.device))  # [T, k]
            ids = topk_ids.masked_fill(is_host, on_device[0])
            self._stream(layer, hidden, ids, topk_weights.masked_fill(is_host, 0), on_device, acc)
        elif on_device:
            self._stream(layer, hidden, topk_ids, topk_weights, on_device, acc)
        for expert, rows, x, w in inputs:
            acc.index_add_(0, rows, self._host_expert(layer, expert, x, w).to(acc.device))

    def _host_expert(
        self, layer: int, expert: int, hidden: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """On the host: hidden [n, H] of the tokens routed to `expert`, their weights [n] ->
        weighted output [n, H] in float32; its time (the GEMMs alone) feeds the choice."""
        assert self.cache.host is not None
        start = time.perf_counter()
        parts = {name: t[None] for name, t in self.cache.store.dequantized(layer, expert).items()}
        w13, w2 = parts.pop("w13"), parts.pop("w2")  # [1, 2I, H], [1, H, I]: a 1-slot view
        ids = torch.zeros(hidden.shape[0], 1, dtype=torch.long)  # [n, 1]: that slot
        out = torch.empty(hidden.shape, dtype=torch.float32)
        part = kernels.fused_moe(
            hidden, w13, w2, weights[:, None], ids, out=out, gating=self.gating, **parts
        )
        self.cache.host.record_host(time.perf_counter() - start, hidden.shape[0])
        return part

    def _resident_first(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        distinct: list[int],
        slots: list[int],
        pending: list[int],
        slot_of: torch.Tensor,
        acc: torch.Tensor,
    ) -> None:
        """The resident experts into `acc` at once, then each missing one as its copy lands."""
        missing = to_device([distinct[i] for i in pending], hidden.device)
        is_missing = torch.isin(topk_ids, missing)  # [T, k]
        waiting = set(pending)
        ready_slot = slots[next(i for i in range(len(distinct)) if i not in waiting)]
        weights = topk_weights.masked_fill(is_missing, 0)
        ids = torch.where(is_missing, torch.full_like(topk_ids, ready_slot), slot_of[topk_ids])
        # each missing expert's (token, k) pairs, read back before any wait is queued: after one,
        # a read-back holds the host until that copy lands (on a GPU)
        found = [(topk_ids == distinct[i]).nonzero(as_tuple=True) for i in pending]
        acc.add_(self.cache.slots.run(hidden, weights, ids, self.gating, float32=True))
        for i, (rows, cols) in zip(pending, found, strict=True):  # each, as its copy lands
            self.cache.wait_ready(slots[i])
            slot_ids = torch.full_like(rows, slots[i])[:, None]
            acc.index_add_(
                0,
                rows,
                self.cache.slots.run(
                    hidden[rows],
                    topk_weights[rows, cols, None],
                    slot_ids,
                    self.gating,
                    float32=True,
                ),
            )

    def _stream(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        distinct: list[int],
        acc: torch.Tensor,
    ) -> None:
        """Pass the experts through the cache in groups of at most its size, into `acc` (one
        group when they fit; more when a layer needs more experts than the cache has slots).
        A group runs only its own (token, k) pairs: each slot's GEMM then has the rows it has
        in one call, and rounds them alike (a CPU bfloat16 GEMM's rows depend on its row count)."""
        capacity = self.cache.num_slots
        for start in range(0, len(distinct), capacity):
            group = distinct[start : start + capacity]
            slots = self.cache.ensure(layer, group)
            slot_of = self._slot_table(group, slots, hidden.device, fill=slots[0])
            if len(group) == len(distinct):  # all at once: every pair, as one call
                acc.add_(
                    self.cache.slots.run(
                        hidden, topk_weights, slot_of[topk_ids], self.gating, float32=True
                    )
                )
            else:
                in_group = torch.isin(topk_ids, to_device(group, hidden.device))
                rows, cols = in_group.nonzero(as_tuple=True)  # [n] each
                ids, weights = slot_of[topk_ids[rows, cols, None]], topk_weights[rows, cols, None]
                part = self.cache.slots.run(hidden[rows], weights, ids, self.gating, float32=True)
                acc.index_add_(0, rows, part)
            self.cache.release(slots)

    def _slot_table(
        self, experts: list[int], slots: list[int], device: torch.device, fill: int = 0
    ) -> torch.Tensor:
        """expert -> slot [E], made on the host and sent as one tensor: every layer builds one,
        and three small ops (fill, a tensor of slots, a scatter) cost several times as much."""
        table = [fill] * self.num_experts
        for expert, slot in zip(experts, slots, strict=True):
            table[expert] = slot
        return to_device(table, device)

    def _prefer_resident(
        self, layer: int, topk_ids: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Swap each token's weakest non-resident experts for its strongest resident experts outside
        the top-k that the router ranks within the margin (never outside a token's allowed groups);
        weights are recomputed from the router."""
        router = self.routers[layer]
        resident = to_device(
            self.cache.resident_mask(layer, self.num_experts), logits.device, torch.bool
        )
        rank, unit = router.ranking(logits)  # [T, E]; -inf where the router may not pick
        selected = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, topk_ids, True)  # [T, E]
        weak = torch.where(selected & ~resident, rank, torch.inf).sort(dim=1)  # ascending
        strong = torch.where(~selected & resident, rank, -torch.inf).sort(dim=1, descending=True)
        weak_unit = unit.gather(1, weak.indices)  # [T, E] key units per logit, weakest first
        ids = topk_ids.clone()
        for j in range(topk_ids.shape[1]):
            margin = self.routing_margin * weak_unit[:, j]
            swap = torch.isfinite(weak.values[:, j]) & (
                strong.values[:, j] >= weak.values[:, j] - margin
            )
            swap &= torch.isfinite(strong.values[:, j])
            rows = swap.nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                break
            old, new = weak.indices[rows, j], strong.indices[rows, j]
            ids[rows] = torch.where(ids[rows] == old[:, None], new[:, None], ids[rows])
            self.rerouted += rows.numel()
        return ids, route_weights(logits, ids, router.cfg).to(dtype)
