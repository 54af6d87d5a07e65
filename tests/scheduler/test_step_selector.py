"""The step selector: expertflow runs route-grouped rounds, each sequence once a round, under the
starvation bound; fcfs rotates in arrival order."""

from __future__ import annotations

import random

import pytest
import torch

from scheduler.step_selector import StepSelector

LAYERS, EXPERTS = 4, 16


def fresh_routes(gen: torch.Generator) -> callable:
    """Routes drawn anew on every call, as each step's next tokens differ."""

    def routes_for(seq_ids: list[int]) -> torch.Tensor:
        scores = torch.rand(len(seq_ids), LAYERS, EXPERTS, generator=gen)
        top = scores.topk(2, -1).indices  # [N, L, 2]
        return torch.zeros(len(seq_ids), LAYERS, EXPERTS, dtype=torch.bool).scatter_(-1, top, True)

    return routes_for


def affine_routes(seed: int) -> tuple[callable, dict[int, torch.Tensor]]:
    """Each sequence keeps one of four prototype routes (with a fresh 20% of picks redrawn each
    step): the routes the selector sees are the routes the tokens take."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, LAYERS, EXPERTS, generator=gen).topk(2, -1).indices  # [4, L, 2]
    taken: dict[int, torch.Tensor] = {}

    def routes_for(seq_ids: list[int]) -> torch.Tensor:
        picks = protos[torch.tensor([(s * 7) % 4 for s in seq_ids])].clone()  # [N, L, 2]
        noisy = torch.rand(picks.shape, generator=gen) < 0.2
        picks[noisy] = torch.randint(EXPERTS, (int(noisy.sum()),), generator=gen)
        routes = torch.zeros(len(seq_ids), LAYERS, EXPERTS, dtype=torch.bool)
        routes.scatter_(-1, picks, True)
        taken.update(zip(seq_ids, routes, strict=True))
        return routes

    return routes_for, taken


def test_each_sequence_runs_once_a_round_even_as_routes_change() -> None:
    selector = StepSelector("expertflow", 8, 2, fresh_routes(torch.Generator().manual_seed(0)))
    seqs = list(range(16))
    for _ in range(10):  # rounds of two steps: the two groups partition the sequences
        first = {seqs[i] for i in selector.select(seqs)}
        second = {seqs[i] for i in selector.select(seqs)}
        assert len(first) == len(second) == 8 and first | second == set(seqs)
    assert selector.stats.rounds == 10 and selector.stats.selected_steps == 20
    assert selector.stats.objective <= selector.stats.fcfs_objective
    assert selector.stats.cost_s > 0


def test_rounds_activate_fewer_experts_than_fcfs() -> None:
    activated = {}
    for policy in ("fcfs", "expertflow"):
        routes_for, taken = affine_routes(seed=1)
        selector = StepSelector(policy, 8, 6, routes_for)  # rounds of 4 groups
        seqs, total = list(range(32)), 0
        for _ in range(40):
            routes_for(seqs)  # what each sequence's next token takes, as the selector sees it
            chosen = [seqs[i] for i in selector.select(seqs)]
            total += int(torch.stack([taken[s] for s in chosen]).any(0).sum())
        activated[policy] = total
    assert activated["expertflow"] <= 0.8 * activated["fcfs"]


def test_a_bound_of_one_step_leaves_only_alternation() -> None:
    selector = StepSelector("expertflow", 4, 1, fresh_routes(torch.Generator().manual_seed(2)))
    seqs = list(range(8))
    previous = set(selector.select(seqs))
    for _ in range(12):
        chosen = set(selector.select(seqs))
        assert chosen == set(range(8)) - previous
        previous = chosen


@pytest.mark.parametrize("group_size,max_defer_steps", [(4, 2), (4, 1), (3, 4), (8, 6), (2, 3)])
def test_no_sequence_waits_longer_than_the_bound_with_arrivals_and_departures(
    group_size: int, max_defer_steps: int
) -> None:
    """Sequences arrive up to the most the bound allows and leave after random run counts, so rounds
    go stale mid-way and, where the bound is tighter than a round, it overrides the plan."""
    rng = random.Random(group_size * 10 + max_defer_steps)
    selector = StepSelector(
        "expertflow", group_size, max_defer_steps, fresh_routes(torch.Generator().manual_seed(3))
    )
    limit = group_size * (max_defer_steps + 1)
    left = {s: rng.randint(1, 10) for s in range(200)}
    arrivals, runnable, longest = list(range(200)), [], 0
    while arrivals or runnable:
        while arrivals and len(runnable) < limit - rng.randint(0, group_size):
            runnable.append(arrivals.pop(0))
        chosen = selector.select(runnable)
        assert len(chosen) == min(group_size, len(runnable)) == len(set(chosen))
        for i in chosen:
            left[runnable[i]] -= 1
        longest = max(longest, max(selector.deferred.values()))
        runnable = [s for s in runnable if left[s] > 0]
    assert longest <= max_defer_steps
    assert longest == max_defer_steps  # the bound is reached, so the test is not vacuous


def test_fcfs_rotates_most_deferred_first() -> None:
    selector = StepSelector("fcfs", 2, 1)
    assert selector.select([10, 11, 12, 13]) == [0, 1]
    assert selector.select([10, 11, 12, 13]) == [2, 3]
    assert selector.select([10, 11, 12, 13]) == [0, 1]
    with pytest.raises(ValueError):
        StepSelector("expertflow", 2, 1)
