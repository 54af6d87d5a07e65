"""Eviction policies: the heap finds the victim a pass over every resident key would."""

from __future__ import annotations

import random

import pytest

from engine.offload.policy import ExpertFlowPolicy, Key, LFUPolicy, LRUPolicy, make_policy


def rule(policy: LRUPolicy | LFUPolicy, key: Key) -> tuple:
    """Each policy's order, written out: the lowest goes first."""
    last = policy.last_use.get(key, -1)
    if isinstance(policy, ExpertFlowPolicy):
        if key in policy.demoted:
            return (0, policy.count[key], last, key)
        if key not in policy.predicted:
            return (1, policy.count[key], last, key)
        return (2, -key[0], policy.count[key], key)  # the furthest predicted layer first
    if isinstance(policy, LFUPolicy):
        return (policy.count[key], last, key)
    return (last, key)


@pytest.mark.parametrize("name", ["lru", "lfu", "expertflow"])
def test_the_victim_is_the_first_evictable_key_in_the_policys_order(name: str) -> None:
    rng = random.Random(0)
    policy = make_policy(name)
    keys = [(layer, expert) for layer in range(4) for expert in range(6)]
    resident: set[Key] = set()
    for tick in range(4000):
        key, op = rng.choice(keys), rng.random()
        if op < 0.25 and key not in resident:
            policy.on_place(key)
            resident.add(key)
        elif op < 0.45 and key in resident:
            policy.on_evict(key)
            resident.discard(key)
        elif op < 0.8:
            policy.on_access(key, tick)
        elif isinstance(policy, ExpertFlowPolicy) and op < 0.9:
            policy.predict(frozenset(rng.sample(keys, rng.randrange(8))))
        elif isinstance(policy, ExpertFlowPolicy) and key in resident:
            policy.demote(key)
        evictable = {k for k in resident if rng.random() < 0.6}  # the rest pinned or in flight
        expected = min(evictable, key=lambda k: rule(policy, k)) if evictable else None
        assert policy.victim(evictable.__contains__) == expected
    assert len(policy._heap) <= 2 * len(resident) + 64 + len(keys)  # stale entries are dropped


@pytest.mark.parametrize("name", ["lru", "lfu", "expertflow"])
def test_a_cache_that_never_evicts_keeps_its_heap_bounded(name: str) -> None:
    policy = make_policy(name)
    keys = [(0, expert) for expert in range(10)]
    for key in keys:
        policy.on_place(key)
    for tick in range(10_000):  # every lookup a hit: ranks change, no victim is ever asked for
        policy.on_access(keys[tick % 10], tick)
        if isinstance(policy, ExpertFlowPolicy):  # predictions come and go, demotions happen
            policy.predict(frozenset(keys[tick % 7 : tick % 7 + 3]))
            policy.demote(keys[tick % 9])
    assert len(policy._heap) <= 2 * len(keys) + 64
    assert policy.victim(keys.__contains__) == (0, 0)  # equal counts: the least recent
