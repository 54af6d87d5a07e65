"""Which of the runnable decodes run this step, when there are more than one step should take.

`fcfs` rotates through them in arrival order (most-deferred first). `expertflow` (EF-24) asks the
token scheduler for the group whose predicted routes overlap most, so the step activates fewer
experts. Either way a sequence waits at most `max_defer_steps` consecutive steps. Routes come from a
callback (the engine's predictor or last observed routes); this module never sees a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from scheduler.token_scheduler import TokenScheduler, TokenSchedulerConfig

RoutesFn = Callable[[list[int]], torch.Tensor]  # seq ids -> bool routes [N, L, E]


@dataclass
class SelectorStats:
    regrouped_steps: int = 0
    objective: int = 0  # distinct experts of the chosen groupings, summed
    fcfs_objective: int = 0  # the same for FCFS chunks of the same candidates
    cost_s: float = 0.0  # time spent clustering


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
            assert self.routes_for is not None
            chosen, grouping = self.grouper.pick(self.routes_for(seq_ids), deferred)
            self.stats.regrouped_steps += 1
            self.stats.objective += grouping.objective
            self.stats.fcfs_objective += grouping.fcfs_objective
            self.stats.cost_s += grouping.cost_s
        picked = set(chosen)
        self.deferred = {s: 0 if i in picked else deferred[i] + 1 for i, s in enumerate(seq_ids)}
        return chosen
