"""Prefetching and the expertflow policy never change outputs and never break the slot pool."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch

import engine.offload.experts as experts_module
from engine import LLM, SamplingParams
from engine.offload.cache import ExpertCache
from engine.offload.horizon import HorizonController
from engine.offload.policy import ExpertFlowPolicy
from engine.offload.prefetch import Prefetcher
from engine.offload.transfer import LOW, Transfer, TransferEngine

if TYPE_CHECKING:
    from tests.conftest import GreedyRun


@pytest.mark.parametrize(
    "flags",
    [
        {"predictor": "pregate", "prefetch_horizon": "1"},
        {"predictor": "pregate", "prefetch_horizon": "auto", "cache_policy": "expertflow"},
        {
            "predictor": "pregate",
            "prefetch_horizon": "2",
            "cache_policy": "expertflow",
            "link_gbps": 1.0,
        },
        {"predictor": "pregate", "cache_policy": "lfu", "expert_cache_size": 3},
    ],
    ids=["pregate-S1", "pregate-auto-expertflow", "pregate-S2-link", "pregate-3-slots"],
)
def test_prefetching_keeps_outputs_identical(
    tiny_checkpoint: Path, flags: dict[str, object], greedy_run: GreedyRun
) -> None:
    reference, _ = greedy_run(tiny_checkpoint)
    flags = {"expert_cache_ratio": 0.5, **flags}
    tokens, llm = greedy_run(tiny_checkpoint, **flags)
    assert tokens == reference
    stats = llm.offload_stats()
    assert stats["prefetch_issued"] > 0
    assert stats["prefetch_used"] <= stats["prefetch_issued"]
    assert stats["transfers"] <= stats["misses"] + stats["prefetch_issued"]
    assert 1 <= stats["prefetch_horizon"] <= len(llm.engine.model_config.moe_layers) - 1


def test_each_layer_reads_its_expert_ids_back_once(
    mixtral_checkpoint: Path, greedy_run: GreedyRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefetcher and the experts share one read-back a layer (a GPU sync each); a clone of
    the ids, as cache-aware routing makes, is read again."""
    read_back, reads = experts_module._distinct, []

    def counted(ids: torch.Tensor) -> list[int]:
        reads.append(ids.shape)
        return read_back(ids)

    monkeypatch.setattr(experts_module, "_distinct", counted)
    _, llm = greedy_run(mixtral_checkpoint, expert_cache_size=4, predictor="pregate")
    assert reads and llm.engine.offload.experts.distinct is llm.engine.offload.prefetcher.distinct
    steps = llm.engine.offload.experts.active_steps
    assert len(reads) == steps * len(llm.engine.model_config.moe_layers)
    ids = torch.tensor([[3, 1], [1, 2]])
    distinct = llm.engine.offload.experts.distinct
    assert distinct(ids) == [1, 2, 3] and distinct(ids.view(-1, 1)) == [1, 2, 3]
    assert distinct(ids.clone().fill_(0)) == [0]
    for numel in (2, experts_module.SMALL_ROUTING, experts_module.SMALL_ROUTING + 2):
        many = torch.randint(0, 64, (numel // 2, 2))  # read on the host, then by `unique`
        assert experts_module._distinct(many) == many.unique().tolist()


def test_failing_prefetches_fail_no_request(
    mixtral_checkpoint: Path, greedy_run: GreedyRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prefetch copy fails on the link's worker: each is dropped, the experts are copied
    again when a layer needs them, and no request fails or changes."""
    reference, _ = greedy_run(mixtral_checkpoint)
    submit, failed = TransferEngine.submit, []

    def flaky(self: TransferEngine, pairs: list, priority: int, then: object = None) -> Transfer:
        if priority != LOW:
            return submit(self, pairs, priority, then)

        def fail() -> None:
            failed.append(1)
            raise OSError("a prefetch copy failed")

        return submit(self, pairs, priority, fail)

    monkeypatch.setattr(TransferEngine, "submit", flaky)
    flags = {"expert_cache_size": 4, "predictor": "pregate", "prefetch_horizon": "1"}
    tokens, llm = greedy_run(mixtral_checkpoint, **flags)
    assert tokens == reference and len(failed) > 0
    assert llm.offload_stats()["misses"] > 0 and not llm.engine.has_unfinished()


def test_prefetcher_never_evicts_a_slot_in_use(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    placed = 0
    original = ExpertCache._place

    def checked_place(self: ExpertCache, key: tuple[int, int], slot: int) -> None:
        nonlocal placed
        assert self.pins[slot] == 0, "evicted a pinned slot"
        assert slot not in self.in_flight, "evicted a slot still being written"
        assert len(self.slot_of) <= self.num_slots
        placed += 1
        original(self, key, slot)

    monkeypatch.setattr(ExpertCache, "_place", checked_place)
    llm = LLM(
        model=str(mixtral_checkpoint),
        max_model_len=64,
        expert_cache_size=5,
        predictor="pregate",
        prefetch_horizon="1",
        cache_policy="expertflow",
        link_gbps=5.0,
    )
    prompts = [[1, *range(10 + i, 14 + 2 * (i % 5))] for i in range(24)]  # 24 concurrent sequences
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == 6 for o in outs)
    cache = llm.engine.offload.cache
    assert placed > cache.num_slots and all(p == 0 for p in cache.pins)
    assert len(cache.slot_of) <= cache.num_slots


def test_expertflow_policy_order() -> None:
    policy = ExpertFlowPolicy()
    candidates = [(1, 0), (3, 1), (0, 2), (0, 3)]
    for tick, key in enumerate(candidates):
        policy.on_place(key)
        policy.on_access(key, tick)
    policy.predict(frozenset({(1, 0), (3, 1)}))  # for MoE layers 1 and 3
    policy.demote((0, 3))
    assert policy.victim(candidates.__contains__) == (0, 3)  # predicted but unused goes first
    assert policy.victim(candidates[:3].__contains__) == (0, 2)  # then no predicted use
    assert policy.victim(candidates[:2].__contains__) == (3, 1)  # then the furthest predicted use
    policy.predict(frozenset({(1, 0)}))
    assert policy.victim(candidates[:2].__contains__) == (3, 1)  # no longer predicted
    policy.on_access((0, 3), 10)
    assert (0, 3) not in policy.demoted
    assert policy.victim(lambda key: False) is None


def test_expertflow_policy_falls_back_to_frequency_not_recency() -> None:
    policy = ExpertFlowPolicy()
    unpredicted = [(0, 0), (0, 1), (0, 2)]
    for key in unpredicted:
        policy.on_place(key)
    for tick, key in enumerate([(0, 0), (0, 0), (0, 0), (0, 1), (0, 2), (0, 2)]):
        policy.on_access(key, tick)
    anyone = unpredicted.__contains__
    assert policy.victim(anyone) == (0, 1)  # used once; (0, 0) is older but used 3 times
    policy.on_access((0, 1), 9)
    policy.on_access((0, 1), 10)
    assert policy.victim(anyone) == (0, 2)  # a tie on count goes to the least recent
    policy.on_evict((0, 2))
    policy.on_evict((0, 0))
    policy.on_place((0, 0))
    assert policy.count[(0, 0)] == 3  # counts survive eviction
    assert policy.victim(anyone) == (0, 0)  # back with its 3 uses: the tie goes by recency


class _Stalls:
    def __init__(self) -> None:
        self.total_s = 0.0

    def resolve_stalls(self) -> float:
        return self.total_s


class _NoPrediction:
    kind, context_window = "none", 0

    def path(self, token_ids: torch.Tensor, context: torch.Tensor) -> None:
        return None

    def ahead(self, index: int, residual, token_ids, topk_ids, horizon: int) -> torch.Tensor:  # noqa: ANN001
        return torch.zeros(0, topk_ids.shape[0], 4)


def _prefetcher(policy: ExpertFlowPolicy, clock: list[float]) -> tuple[Prefetcher, SimpleNamespace]:
    issued: list[tuple[int, list[int], int | None]] = []

    def prefetch(layer: int, experts: list[int], limit: int | None = None) -> int:
        issued.append((layer, list(experts), limit))
        return len(experts[:limit])

    cache = SimpleNamespace(
        issued=issued,
        prefetch=prefetch,
        copying=lambda: False,
        outstanding_prefetches=lambda: 0,
        num_slots=4,
        protected=set(),
        prefetched=set(),
        policy=policy,
        stats=SimpleNamespace(prefetch_late=0),
        completed=deque(),
        transfers=_Stalls(),
    )
    horizon = HorizonController(max_horizon=2, expert_bytes=1000)
    prefetcher = Prefetcher(_NoPrediction(), cache, (0, 1, 2), horizon, 2, clock=lambda: clock[0])  # type: ignore[arg-type]
    return prefetcher, cache


def test_layer_time_excludes_the_stall_inside_the_layer() -> None:
    clock = [0.0]
    prefetcher, cache = _prefetcher(ExpertFlowPolicy(), clock)
    prefetcher.begin_step(torch.tensor([7]), torch.zeros(1, 0, dtype=torch.long))
    ids, x = torch.tensor([[0, 1]]), torch.zeros(1, 8)
    clock[0] = 1.0
    prefetcher.on_route(0, x, torch.zeros(1, 4), ids)
    clock[0], cache.transfers.total_s = 3.0, 1.5  # 2 s between routers, 1.5 s of it stalled
    prefetcher.on_route(1, x, torch.zeros(1, 4), ids)
    assert prefetcher.horizon.layer_time_s == pytest.approx(0.5)


def test_only_prefetched_experts_are_demoted_when_unused() -> None:
    policy = ExpertFlowPolicy()
    prefetcher, cache = _prefetcher(policy, [0.0])
    prefetcher.predicted[1] = {1, 2, 3}  # 1 was copied in for layer 1; 2 and 3 were resident
    cache.prefetched.add((1, 1))
    prefetcher._score(1, torch.tensor([[0, 3]]), [0, 3])  # layer 1 used experts 0 and 3
    assert policy.demoted == {(1, 1)}
    assert prefetcher.precision == pytest.approx(1 / 3)


def test_recall_scores_the_one_layer_ahead_guess_against_the_routing() -> None:
    prefetcher, _ = _prefetcher(ExpertFlowPolicy(), [0.0])
    assert prefetcher.recall == 0.0  # nothing scored yet
    guess = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.3, 0.5, 0.1]])  # top-2 {0, 1}, {2, 1}
    for actual in ([[0, 2], [2, 1]], [[1, 0], [1, 2]]):  # 3 of 4 found, then all 4
        prefetcher._prefetch(
            prefetcher._rank_ahead(guess[None]), first_index=1
        )  # ranking layer 1 keeps the guess
        prefetcher._score(1, torch.tensor(actual), sorted({e for row in actual for e in row}))
    assert prefetcher.recall == pytest.approx((0.75 + 1.0) / 2)
    prefetcher._prefetch(
        prefetcher._rank_ahead(guess[None, :1]), first_index=1
    )  # a guess for other tokens: not scored
    prefetcher._score(1, torch.tensor([[3, 2], [3, 2]]), [2, 3])
    assert prefetcher.recall == pytest.approx(0.875) and prefetcher.recall_count == 2


def test_a_path_is_scored_when_nothing_lies_ahead_to_prefetch() -> None:
    """One MoE layer: the horizon is 0, nothing is prefetched, and the path's guess for layer 0
    is still scored."""
    guess = torch.tensor([[[0.5, 0.3, 0.1, 0.1]]])  # [L=1, T=1, E=4]: top-2 {0, 1}
    predictor = SimpleNamespace(kind="rpp", context_window=0, path=lambda ids, ctx: guess)
    prefetcher, cache = _prefetcher(ExpertFlowPolicy(), [0.0])
    horizon = HorizonController(max_horizon=0, expert_bytes=1000)
    prefetcher = Prefetcher(predictor, cache, (0,), horizon, 2)  # type: ignore[arg-type]
    prefetcher.begin_step(torch.tensor([7]), torch.zeros(1, 0, dtype=torch.long))
    prefetcher._score(0, torch.tensor([[1, 3]]), [1, 3])
    assert cache.issued == [] and prefetcher.recall == pytest.approx(0.5)


def test_predictions_rank_each_layer_by_summed_probability() -> None:
    prefetcher, _ = _prefetcher(ExpertFlowPolicy(), [0.0])
    probs = torch.tensor(
        [
            [[0.5, 0.3, 0.1, 0.1], [0.1, 0.3, 0.5, 0.1]],  # top-2 {0, 1} and {2, 1}
            [[0.0, 0.1, 0.4, 0.5], [0.4, 0.1, 0.0, 0.5]],  # {3, 2} and {3, 0}: 2 and 0 tie
            [[0.2, 0.2, 0.3, 0.3], [0.2, 0.2, 0.3, 0.3]],  # {2, 3}, twice: another tie
        ]
    )  # [h=3, T=2, E=4]
    ranked, top_ids = prefetcher._ranked(probs)
    assert ranked == [[1, 0, 2], [3, 0, 2], [2, 3]]
    assert torch.equal(top_ids, probs.topk(2, dim=-1).indices)  # [h, T, k]: scored later
    deeper = torch.tensor([[[0.1, 0.4, 0.2, 0.3]]])
    assert prefetcher._ranked(deeper, depth=3)[0] == [[1, 3, 2]]
    assert prefetcher._ranked(probs[:0])[0] == []


def test_an_idle_fast_link_takes_one_guess_beyond_the_top_k() -> None:
    probs = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])  # [h=1, T=1, E=4]: top-2 {0, 1}, then 2
    for layer_time_s, copying, runner_up in [
        (2e-3, False, True),
        (0.5e-3, False, False),
        (2e-3, True, False),
    ]:
        prefetcher, cache = _prefetcher(ExpertFlowPolicy(), [0.0])
        cache.copying = lambda copying=copying: copying
        prefetcher.horizon.observe_transfer(1000, 1e-3)  # a copy takes 1 ms
        prefetcher.horizon.observe_layer_time(layer_time_s)
        prefetcher._prefetch(prefetcher._rank_ahead(probs), first_index=1)
        assert cache.issued[0][:2] == (1, [0, 1])  # the top-k first
        assert ((1, [2], 1) in cache.issued) == runner_up  # a slow or busy link guesses nothing
