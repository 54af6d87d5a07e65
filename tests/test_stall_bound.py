"""The link-capacity stall bound is a bound: a prefetcher that knows the future, on a serial link,
never stalls less; and it is not vacuous."""

from __future__ import annotations

import bisect
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from stall_bound import stall_lower_bound, stall_lower_bound_of  # noqa: E402

Key = tuple[int, int]


def clairvoyant_stall(
    lookups: list[tuple[int, list[int]]], compute_s: list[float], capacity: int, copy_s: float
) -> float:
    """Stall of a serial link that always copies the next-needed missing key as soon as a slot
    is free or holds a key needed later (Belady's victim), while compute runs."""
    calls = [[(layer, e) for e in experts] for layer, experts in lookups]
    uses: dict[Key, list[int]] = {}
    for i, keys in enumerate(calls):
        for key in keys:
            uses.setdefault(key, []).append(i)

    def next_use(key: Key, pos: int) -> float:
        times = uses[key]
        i = bisect.bisect_left(times, pos)
        return times[i] if i < len(times) else float("inf")

    resident: set[Key] = set()
    inflight: tuple[Key, float] | None = None
    link_free = 0.0

    def advance(since: float, until: float, pos: int) -> None:
        """Run the link from `since` (when call `pos` became the next) to `until`."""
        nonlocal inflight, link_free
        while True:
            if inflight is not None:
                if inflight[1] > until:
                    return
                resident.add(inflight[0])
                link_free, inflight = inflight[1], None
            wanted = [k for i in range(pos, len(calls)) for k in calls[i] if k not in resident]
            if not wanted:
                return
            key, when = wanted[0], next_use(wanted[0], pos)
            start = max(link_free, since)
            if start > until:
                return
            if len(resident) + 1 > capacity:
                victim = max(resident, key=lambda k: next_use(k, pos))
                if next_use(victim, pos) <= when:
                    return
                resident.remove(victim)
            inflight = (key, start + copy_s)

    now = stall = 0.0
    for i, keys in enumerate(calls):
        advance(now, now, i)
        while not set(keys) <= resident:
            assert inflight is not None, "the link must be copying a key this call needs"
            landed = max(now, inflight[1])
            stall += landed - now
            advance(now, landed, i)
            now = landed
        advance(now, now + compute_s[i], i)
        now += compute_s[i]
    return stall


def random_run(rng: random.Random) -> tuple[list[tuple[int, list[int]]], list[float], int, float]:
    layers, experts = rng.randint(1, 4), rng.randint(2, 8)
    top_k = rng.randint(1, min(3, experts))
    lookups = [
        (i % layers, sorted(rng.sample(range(experts), rng.randint(1, top_k))))
        for i in range(rng.randint(5, 60))
    ]
    compute = [rng.uniform(0.0, 2.0) for _ in lookups]
    capacity = rng.randint(top_k, layers * experts)
    return lookups, compute, capacity, rng.uniform(0.2, 3.0)


def test_never_above_a_clairvoyant_prefetchers_stall() -> None:
    rng = random.Random(0)
    positive = 0
    for _ in range(300):
        lookups, compute, capacity, copy_s = random_run(rng)
        bound = stall_lower_bound(lookups, compute, capacity, copy_s)
        assert bound <= clairvoyant_stall(lookups, compute, capacity, copy_s) + 1e-9
        positive += bound > 0
    assert positive > 30  # it says something in a good share of the runs


def test_counts_what_no_slot_holds() -> None:
    # one slot, four experts in a row, no compute: 4 keys - 1 slot = 3 copies
    lookups = [(0, [e]) for e in range(4)]
    assert stall_lower_bound(lookups, [0.0] * 4, 1, 1.5) == pytest.approx(4.5)
    # compute hides copies: 1.0 s of it leaves 3 copies * 1.5 s - 1.0 s
    assert stall_lower_bound(lookups, [0.25] * 4, 1, 1.5) == pytest.approx(3.5)
    # the working set fits: nothing to bound
    assert stall_lower_bound(lookups, [0.0] * 4, 4, 1.5) == 0.0


def test_compute_times_must_match_calls() -> None:
    with pytest.raises(ValueError, match="3 compute times for 4 layer calls"):
        stall_lower_bound([(0, [e]) for e in range(4)], [0.0] * 3, 1, 1.0)


def test_counted_calls_are_bounded_in_their_own_runs() -> None:
    # a wide call (a prefill) between narrow ones: only it outgrows the slots
    lookups = [(0, [0]), (0, [0, 1, 2, 3]), (0, [0])]
    compute = [0.0, 0.0, 0.0]
    assert stall_lower_bound(lookups, compute, 2, 1.0) == pytest.approx(2.0)
    assert stall_lower_bound_of(lookups, compute, [True, False, True], 2, 1.0) == 0.0
    # two runs of one-slot calls, each bounded alone: windows never span the uncounted call
    lookups = [(0, [0]), (0, [1]), (0, [2]), (0, [3]), (0, [4]), (0, [5])]
    counted = [True, True, False, True, True, True]
    assert stall_lower_bound_of(lookups, [0.0] * 6, counted, 1, 1.0) == pytest.approx(1.0 + 2.0)


def test_never_above_the_real_caches_stall_on_the_simulated_link() -> None:
    """The production cache, policies and prefetcher on replay.py's link: calls wider than the
    slots (streamed) and prefetches included, none stalls less than the bound of its lookups."""
    from replay import Cost, link_bound, replay, wave_steps

    from tests.synthetic_traces import synthetic_traces

    traces, positive = synthetic_traces(8, seed=1), 0
    for layer_s in (0.05, 0.5):
        cost = Cost("test", expert_bytes=100, link_bps=100.0, layer_s=layer_s)  # a copy: 1 s
        for batch, ratio in ((1, 0.25), (4, 0.1), (4, 0.5)):  # 0.1: one slot, two experts a call
            steps = wave_steps(traces, batch, 6)
            for policy, predictor in (("lru", "none"), ("expertflow", "oracle")):
                r = replay(traces, cost, ratio, policy, predictor, steps)
                bound = link_bound(r, cost)
                assert bound <= r["stall_s"] + 1e-9
                positive += bound > 0
    assert positive >= 6
