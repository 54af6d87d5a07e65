"""Eviction policies of the expert cache. A key is (layer, expert); the cache asks for a victim among
the slots it may evict (not pinned, not in flight)."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

Key = tuple[int, int]


class EvictionPolicy(Protocol):
    def on_access(self, key: Key, tick: int) -> None:
        """`key` was used at `tick` (a cache lookup, hit or miss)."""

    def on_evict(self, key: Key) -> None: ...

    def victim(self, candidates: list[Key]) -> Key:
        """Pick the key to evict among `candidates` (non-empty)."""
        ...


class LRUPolicy:
    """Least recently used: mixtral-offloading's per-layer LRU, here over one global pool."""

    def __init__(self) -> None:
        self.last_use: dict[Key, int] = {}

    def on_access(self, key: Key, tick: int) -> None:
        self.last_use[key] = tick

    def on_evict(self, key: Key) -> None:
        self.last_use.pop(key, None)

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.last_use.get(k, -1), k))


class LFUPolicy:
    """Least frequently used over the whole history (MoE-Infinity's activation counts); ties by recency."""

    def __init__(self) -> None:
        self.count: Counter[Key] = Counter()
        self.last_use: dict[Key, int] = {}

    def on_access(self, key: Key, tick: int) -> None:
        self.count[key] += 1
        self.last_use[key] = tick

    def on_evict(self, key: Key) -> None:
        """Counts survive eviction: a popular expert comes back with its history."""

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count[k], self.last_use.get(k, -1), k))


class ExpertFlowPolicy(LFUPolicy):
    """Predicted-need aware (EF-24's correction + EF-25's protected window): a prefetched expert its
    layer did not use is demoted and goes first; then experts with no predicted use, least frequently
    used first (frequency, not recency: expert popularity is skewed and lasting, and LFU beats LRU
    on every trace we measured); experts predicted ahead go last, the furthest predicted use first."""

    def __init__(self) -> None:
        super().__init__()
        self.next_use: dict[Key, int] = {}  # key -> MoE layers until its predicted use
        self.demoted: set[Key] = set()

    def predict(self, next_use: dict[Key, int]) -> None:
        self.next_use = next_use

    def demote(self, key: Key) -> None:
        self.demoted.add(key)

    def on_access(self, key: Key, tick: int) -> None:
        super().on_access(key, tick)
        self.demoted.discard(key)

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self.demoted.discard(key)

    def victim(self, candidates: list[Key]) -> Key:
        def rank(k: Key) -> tuple[int, int, int, Key]:
            if k in self.demoted:
                return (0, self.count[k], self.last_use.get(k, -1), k)
            if k not in self.next_use:
                return (1, self.count[k], self.last_use.get(k, -1), k)
            return (2, -self.next_use[k], self.count[k], k)

        return min(candidates, key=rank)


POLICIES: dict[str, type] = {"lru": LRUPolicy, "lfu": LFUPolicy, "expertflow": ExpertFlowPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
