"""Belady's optimum is a lower bound: never more misses than LRU replayed on the same sequence."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from belady import belady_misses  # noqa: E402


def lru_misses(lookups: list[tuple[int, list[int]]], capacity: int) -> int:
    order: list[tuple[int, int]] = []
    misses = 0
    for layer, experts in lookups:
        for e in experts:
            key = (layer, e)
            if key in order:
                order.remove(key)
            else:
                misses += 1
                if len(order) >= capacity:
                    order.pop(0)
            order.append(key)
    return misses


def test_textbook_sequence() -> None:
    seq = [(0, [e]) for e in [1, 2, 3, 1, 4, 1, 2, 5, 1, 2, 3]]
    assert belady_misses(seq, 3, []) == 6


def test_never_worse_than_lru() -> None:
    rng = random.Random(0)
    for _ in range(20):
        seq = [(rng.randrange(3), sorted(rng.sample(range(8), 2))) for _ in range(200)]
        assert belady_misses(seq, 6, []) <= lru_misses(seq, 6)
