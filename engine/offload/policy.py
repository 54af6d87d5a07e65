"""Eviction policies of the expert cache. A key is (layer, expert); the cache asks for a victim among
the slots it may evict (not pinned, not in flight).

Each policy ranks the resident keys and keeps them in a heap, so that finding a victim costs a few
heap operations instead of a pass over every slot: a real model's pool holds thousands of experts
(Qwen3-30B-A3B has 6,144, DeepSeek-V3 14,848), and the pass cost milliseconds a layer."""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Protocol

Key = tuple[int, int]
Rank = tuple[int, ...]  # ends with the key itself: ranks never tie


class EvictionPolicy(Protocol):
    def on_place(self, key: Key) -> None:
        """`key` now sits in a slot."""

    def on_access(self, key: Key, tick: int) -> None:
        """`key` was used at `tick` (a cache lookup, hit or miss)."""

    def on_evict(self, key: Key) -> None: ...

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """The resident key to evict first among those `evictable` accepts (None: none is)."""
        ...


class RankedPolicy(ABC):
    """The resident keys in a heap by `rank` (lowest goes first), lazily: each has an entry no
    higher than its rank. A rank that rises (a use) pushes nothing, so a hit costs what it did
    before the heap; its old entry, popped early, goes back at the new rank. A rank that falls
    (a demotion) must be pushed at once, through `_lowered`."""

    def __init__(self) -> None:
        self._resident: set[Key] = set()
        self._heap: list[tuple[Rank, Key]] = []

    @abstractmethod
    def rank(self, key: Key) -> Rank:
        """The order in which `key` goes: the lowest first; a use may only raise it."""

    def on_place(self, key: Key) -> None:
        self._resident.add(key)
        heapq.heappush(self._heap, (self.rank(key), key))
        self._compact()

    def on_evict(self, key: Key) -> None:
        self._resident.discard(key)

    def _lowered(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if key in self._resident:
                heapq.heappush(self._heap, (self.rank(key), key))
        self._compact()

    def _compact(self) -> None:
        """Rebuild once the entries outnumber twice the resident keys (old ranks, evicted keys)."""
        if len(self._heap) > 2 * len(self._resident) + 64:
            self._heap = [(self.rank(key), key) for key in self._resident]
            heapq.heapify(self._heap)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """Pop entries until one is current and evictable; the current ones passed over go back
        (pinned or in flight: a few; protected: up to half the slots when a predictor guards
        experts that lru or lfu rank low)."""
        passed: list[tuple[Rank, Key]] = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            rank, key = entry
            if key not in self._resident:
                continue
            current = self.rank(key)
            if rank != current:
                if rank < current:  # risen since it was pushed: back in at its rank
                    heapq.heappush(self._heap, (current, key))
                continue  # else fallen, and pushed again then: this entry is a leftover
            passed.append(entry)
            if evictable(key):
                found = key
                break
        for entry in passed:  # the victim's entry too: a leftover once it is evicted
            heapq.heappush(self._heap, entry)
        self._compact()
        return found


class LRUPolicy(RankedPolicy):
    """Least recently used: mixtral-offloading's per-layer LRU, here over one global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.last_use: dict[Key, int] = {}

    def rank(self, key: Key) -> Rank:
        return (self.last_use.get(key, -1), *key)

    def on_access(self, key: Key, tick: int) -> None:
        self.last_use[key] = tick

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self.last_use.pop(key, None)


class LFUPolicy(RankedPolicy):
    """Least frequently used over the whole history (MoE-Infinity's activation counts); ties by recency."""

    def __init__(self) -> None:
        super().__init__()
        self.count: Counter[Key] = Counter()
        self.last_use: dict[Key, int] = {}

    def rank(self, key: Key) -> Rank:
        return (self.count[key], self.last_use.get(key, -1), *key)

    def on_access(self, key: Key, tick: int) -> None:
        """Counts survive eviction: a popular expert comes back with its history."""
        self.count[key] += 1
        self.last_use[key] = tick


class ExpertFlowPolicy(LFUPolicy):
    """Predicted-need aware (EF-24's correction + EF-25's protected window): a prefetched expert its
    layer did not use is demoted and goes first; then experts with no predicted use, least frequently
    used first (frequency, not recency: expert popularity is skewed and lasting, and LFU beats LRU
    on every trace we measured); experts predicted ahead go last, the furthest predicted use first.
    Predictions reach only the layers ahead in the current step, so the furthest use is the
    latest layer: a prediction's rank never changes while it stands."""

    def __init__(self) -> None:
        super().__init__()
        self.predicted: frozenset[Key] = frozenset()  # predicted for this layer or those ahead
        self.demoted: set[Key] = set()

    def rank(self, key: Key) -> Rank:
        if key in self.demoted:
            return (0, self.count[key], self.last_use.get(key, -1), *key)
        if key not in self.predicted:
            return (1, self.count[key], self.last_use.get(key, -1), *key)
        return (2, -key[0], self.count[key], *key)

    def predict(self, predicted: frozenset[Key]) -> None:
        before, self.predicted = self.predicted, predicted
        self._lowered(before - predicted)  # no longer predicted: down from the last tier

    def demote(self, key: Key) -> None:
        self.demoted.add(key)
        self._lowered((key,))

    def on_access(self, key: Key, tick: int) -> None:
        self.demoted.discard(key)
        super().on_access(key, tick)

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self.demoted.discard(key)


POLICIES: dict[str, type] = {"lru": LRUPolicy, "lfu": LFUPolicy, "expertflow": ExpertFlowPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
