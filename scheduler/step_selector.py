"""Which of the runnable decodes run this step, when there are more than one step should take.

`fcfs` rotates through them in arrival order (most-deferred first). `expertflow` (EF-24) works in
rounds, as EF-24 pools the tokens of consecutive batches and splits them into equal batches: at the
start of a round the token scheduler partitions all runnable decodes by predicted route into
ceil(N / group_size) groups, and each step runs the next group. Every sequence then advances once
a round, as under FCFS, so the grouping costs no extra steps. Regrouping from scratch every step
instead lets the best-fitting sequences run ahead and leaves ill-fitting stragglers to steps that
the starvation bound fills for it; and with max_defer_steps = 1 and N = 2 * group_size that bound
alone fixes every step after the first, leaving nothing to choose. A round of k groups keeps a
sequence waiting up to 2(k - 1) steps; with a tighter `max_defer_steps` the bound overrides the
plan. Routes come from a callback (the engine's predictor or last observed routes); this module
never sees a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scheduler.token_scheduler import TokenScheduler, TokenSchedulerConfig

RoutesFn = Callable[[list[int]], torch.Tensor]  # seq ids -> bool routes [N, L, E]


@dataclass
class SelectorStats:
    selected_steps: int = 0  # steps with more runnable decodes than one group
    rounds: int = 0  # partitions made (one per round)
    objective: int = 0  # distinct experts of the rounds' partitions (predicted routes), summed
    fcfs_objective: int = 0  # the same for FCFS chunks of the same candidates
    cost_s: float = 0.0  # time spent choosing (routes, clustering, picking)


class StepSelector:
    def __init__(
        self, policy: str, group_size: int, max_defer_steps: int, routes_for: RoutesFn | None = None
    ) -> None:
        if policy not in ("fcfs", "expertflow"):
            raise ValueError(f"token scheduler {policy!r}: choose fcfs or expertflow")
        if policy == "expertflow" and routes_for is None:
            raise ValueError("the expertflow token scheduler needs routes")
        self.policy, self.group_size, self.routes_for = policy, group_size, routes_for
        self.grouper = TokenScheduler(TokenSchedulerConfig(group_size, max_defer_steps))
        self.deferred: dict[int, int] = {}
        self.plan: list[list[int]] = []  # this round's groups still to run, as seq ids
        self.stats = SelectorStats()

    def select(self, seq_ids: list[int]) -> list[int]:
        """seq_ids in arrival order -> indices of those that run this step."""
        deferred = [self.deferred.get(s, 0) for s in seq_ids]
        if len(seq_ids) <= self.group_size:
            chosen = list(range(len(seq_ids)))
        elif self.policy == "fcfs":
            order = sorted(range(len(seq_ids)), key=lambda i: (-deferred[i], i))
            chosen = sorted(order[: self.group_size])
        else:
            chosen = self._expertflow(seq_ids, deferred)
        picked = set(chosen)
        self.deferred = {s: 0 if i in picked else deferred[i] + 1 for i, s in enumerate(seq_ids)}
        return chosen

    def _expertflow(self, seq_ids: list[int], deferred: list[int]) -> list[int]:
        """Run the plan's next group (planning a new round when it is used up) under the bound."""
        start = time.perf_counter()
        assert self.routes_for is not None
        routes = self.routes_for(seq_ids)  # [N, L, E]
        index = {s: i for i, s in enumerate(seq_ids)}
        self.plan = [g for g in ([s for s in g if s in index] for g in self.plan) if g]
        if not self.plan:
            grouping = self.grouper.group(routes)
            groups = sorted(grouping.groups, key=lambda g: (-sum(deferred[i] for i in g), g[0]))
            self.plan = [[seq_ids[i] for i in g] for g in groups]
            self.stats.rounds += 1
            self.stats.objective += grouping.objective
            self.stats.fcfs_objective += grouping.fcfs_objective
        chosen = self.grouper.pick(routes, deferred, [index[s] for s in self.plan[0]])
        ran = {seq_ids[i] for i in chosen}
        self.plan = [g for g in ([s for s in g if s not in ran] for g in self.plan) if g]
        self.stats.selected_steps += 1
        self.stats.cost_s += time.perf_counter() - start
        return chosen
