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


POLICIES: dict[str, type] = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
