"""EF-24 token scheduler: balanced route clustering, swap refinement of its objective, and the
starvation bound of `pick`."""

from __future__ import annotations

import random

import pytest
import torch

from scheduler.token_scheduler import (
    TokenScheduler,
    TokenSchedulerConfig,
    activated_experts,
    balanced_kmedoids,
    fcfs_groups,
    refine,
)


def random_routes(n: int, layers: int = 8, experts: int = 16, top_k: int = 2, seed: int = 0):
    scores = torch.rand(n, layers, experts, generator=torch.Generator().manual_seed(seed))
    top = scores.topk(top_k, -1).indices  # [N, L, k]
    return torch.zeros(n, layers, experts, dtype=torch.bool).scatter_(-1, top, True)


def planted_routes(
    clusters: int, per_cluster: int, layers: int = 16, experts: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled noisy copies of `clusters` prototype routes (top-2 per layer, 20% of picks redrawn)."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(clusters, layers, experts, generator=gen).topk(2, -1).indices  # [C, L, 2]
    labels = torch.arange(clusters).repeat_interleave(per_cluster)  # [N]
    picks = protos[labels].clone()  # [N, L, 2]
    noisy = torch.rand(picks.shape, generator=gen) < 0.2
    picks[noisy] = torch.randint(experts, (int(noisy.sum()),), generator=gen)
    routes = torch.zeros(len(labels), layers, experts, dtype=torch.bool).scatter_(-1, picks, True)
    perm = torch.randperm(len(labels), generator=gen)
    return routes[perm], labels[perm]


def purity(groups: list[list[int]], labels: torch.Tensor) -> float:
    return sum(int(torch.bincount(labels[g]).max()) for g in groups) / len(labels)


def test_groups_partition_the_candidates_in_balanced_sizes() -> None:
    for n in range(1, 41):
        routes = random_routes(n, seed=n)
        for group_size in (1, 2, 3, 5, 8, 16, 64):
            groups = balanced_kmedoids(routes, group_size)
            sizes = [len(g) for g in groups]
            assert sorted(i for g in groups for i in g) == list(range(n))
            assert len(groups) == -(-n // group_size)
            assert max(sizes) - min(sizes) <= 1 and max(sizes) <= group_size, (n, group_size)


def test_activated_experts_counts_the_union_per_group_and_layer() -> None:
    routes = torch.tensor([[[1, 0, 0]], [[0, 1, 0]], [[1, 0, 0]]], dtype=torch.bool)  # [3, 1, 3]
    assert activated_experts(routes, [[0, 2], [1]]) == 2
    assert activated_experts(routes, [[0, 1], [2]]) == 3
    grouping = TokenScheduler(TokenSchedulerConfig(group_size=2)).group(routes)
    assert (grouping.groups, grouping.objective, grouping.fcfs_objective) == ([[0, 2], [1]], 2, 3)


@pytest.mark.parametrize("group_size", [16, 8])
def test_recovers_planted_clusters_and_beats_fcfs(group_size: int) -> None:
    routes, labels = planted_routes(clusters=4, per_cluster=16)
    grouping = TokenScheduler(TokenSchedulerConfig(group_size=group_size)).group(routes)
    assert purity(grouping.groups, labels) >= 0.9
    assert grouping.objective <= 0.7 * grouping.fcfs_objective


def test_deterministic_for_a_seed_and_balanced_for_any_seed() -> None:
    routes = random_routes(50, seed=3)
    assert balanced_kmedoids(routes, 8, seed=7) == balanced_kmedoids(routes, 8, seed=7)
    for seed in range(5):
        sizes = [len(g) for g in balanced_kmedoids(routes, 8, seed=seed)]
        assert sorted(sizes) == [7, 7, 7, 7, 7, 7, 8]


def test_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        balanced_kmedoids(torch.rand(4, 2, 3), 2)
    with pytest.raises(ValueError):
        TokenSchedulerConfig(group_size=0)
    scheduler = TokenScheduler(TokenSchedulerConfig(group_size=2, max_defer_steps=1))
    with pytest.raises(ValueError, match="at most"):
        scheduler.pick(random_routes(5), [0] * 5, [])  # 5 > 2 * (1 + 1): no rule keeps the bound
    with pytest.raises(ValueError):
        scheduler.pick(random_routes(3), [0, 0], [])
    with pytest.raises(ValueError, match="preferred"):
        scheduler.pick(random_routes(3), [0, 0, 0], [3])
    with pytest.raises(ValueError):
        TokenSchedulerConfig(group_size=2, restarts=0)


def test_empty_and_small_candidate_sets() -> None:
    scheduler = TokenScheduler(TokenSchedulerConfig(group_size=4))
    assert scheduler.pick(random_routes(0), [], []) == []
    assert scheduler.pick(random_routes(3), [0, 0, 0], []) == [0, 1, 2]


def test_runs_ahead_of_a_pile_up_at_the_bound() -> None:
    # Two slots a step, bound 2; sequence i and i + 3 share a route. Pairing the clusters would run
    # {0, 3} now and leave 1, 2 at the bound next step, then 3, 4, 5 at it together: one too many.
    scheduler = TokenScheduler(TokenSchedulerConfig(group_size=2, max_defer_steps=2))
    routes = random_routes(3).repeat(2, 1, 1)  # [6, L, E]
    deferred = [1, 1, 1, 0, 0, 0]
    assert scheduler.pick(routes, deferred, [0, 3]) == [0, 1]  # the bound overrides the plan
    for _ in range(12):
        chosen = scheduler.pick(routes, deferred, [0, 3])
        deferred = [0 if i in chosen else d + 1 for i, d in enumerate(deferred)]
        assert max(deferred) <= 2


def test_more_overdue_than_slots_runs_the_most_deferred_first() -> None:
    scheduler = TokenScheduler(TokenSchedulerConfig(group_size=2, max_defer_steps=1))
    assert scheduler.pick(random_routes(4), [1, 3, 1, 2], [0, 2]) == [1, 3]


def test_fills_after_the_forced_from_the_preferred_then_by_fewest_new_experts() -> None:
    routes, labels = planted_routes(clusters=2, per_cluster=4)
    scheduler = TokenScheduler(TokenSchedulerConfig(group_size=4, max_defer_steps=2))
    ones = (labels == 1).nonzero().flatten().tolist()
    zeros = (labels == 0).nonzero().flatten().tolist()
    overdue = [2 if i == zeros[0] else 0 for i in range(8)]
    assert scheduler.pick(routes, overdue, ones) == sorted([zeros[0], *ones[:3]])
    # a short preferred group is topped up with its own cluster: they add the fewest experts
    assert scheduler.pick(routes, [0] * 8, ones[:2]) == sorted(ones)


@pytest.mark.parametrize("group_size,max_defer_steps", [(8, 3), (1, 2), (4, 0), (3, 5), (4, 3)])
def test_no_runnable_sequence_waits_longer_than_the_bound(
    group_size: int, max_defer_steps: int
) -> None:
    """256 sequences, each runnable until it has run a random number of steps; arrivals keep the
    runnable set at the largest size the bound allows, so whole cohorts approach it together; the
    preferred group is random, so the bound cannot rely on the plan."""
    scheduler = TokenScheduler(TokenSchedulerConfig(group_size, max_defer_steps))
    rng = random.Random(0)
    routes = random_routes(256, layers=4, experts=16)
    left = [rng.randint(1, 12) for _ in range(256)]
    arrivals, runnable, deferred, longest = list(range(256)), [], [0] * 256, 0
    while arrivals or runnable:
        while arrivals and len(runnable) < scheduler.config.max_candidates:
            runnable.append(arrivals.pop(0))
        preferred = rng.sample(range(len(runnable)), min(group_size, len(runnable)))
        chosen = scheduler.pick(routes[runnable], [deferred[s] for s in runnable], preferred)
        assert len(chosen) == min(group_size, len(runnable)) == len(set(chosen))
        ran = {runnable[i] for i in chosen}
        for s in runnable:
            deferred[s] = 0 if s in ran else deferred[s] + 1
            left[s] -= s in ran
            longest = max(longest, deferred[s])
        runnable = [s for s in runnable if left[s] > 0]
    assert longest <= max_defer_steps
    assert longest == max_defer_steps  # the bound is reached, so the test is not vacuous


def test_cost_is_measured_and_sane() -> None:
    routes = random_routes(64, layers=32, experts=64, top_k=4)  # L*E = 2048
    grouping = TokenScheduler(TokenSchedulerConfig(group_size=8)).group(routes)
    assert 0 < grouping.cost_s < 1.0


def test_swaps_fix_what_the_clustering_got_wrong_and_never_make_it_worse() -> None:
    protos = random_routes(2, seed=1)  # [2, L, E]
    routes = protos[torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])]  # one member of each cluster swapped
    wrong = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert refine(routes, wrong, 16) == [[0, 1, 2, 7], [3, 4, 5, 6]]
    for seed in range(20):
        routes = random_routes(24, seed=seed)
        for groups in (fcfs_groups(24, 6), balanced_kmedoids(routes, 6, seed=seed)):
            refined = refine(routes, groups, 16)
            assert sorted(map(len, refined)) == sorted(map(len, groups))
            assert sorted(i for g in refined for i in g) == list(range(24))
            assert activated_experts(routes, refined) <= activated_experts(routes, groups)


def test_more_restarts_never_raise_the_objective() -> None:
    for seed in range(10):
        routes = random_routes(32, seed=seed)
        one = TokenScheduler(TokenSchedulerConfig(group_size=8, restarts=1)).group(routes)
        four = TokenScheduler(TokenSchedulerConfig(group_size=8, restarts=4)).group(routes)
        assert four.objective <= one.objective == activated_experts(routes, one.groups)
        assert four.objective == activated_experts(routes, four.groups)
