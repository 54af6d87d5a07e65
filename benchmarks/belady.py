"""Belady's optimal eviction over a recorded lookup sequence: the fewest misses any policy could have
with the same slots, warm start and pinning (a layer's experts are resident together)."""

from __future__ import annotations

from collections import defaultdict

Key = tuple[int, int]


def belady_misses(lookups: list[tuple[int, list[int]]], capacity: int, warm: list[Key]) -> int:
    """lookups: (layer, distinct experts) per layer call, in order; warm: keys resident at start."""
    keys = [[(layer, e) for e in experts] for layer, experts in lookups]
    uses: dict[Key, list[int]] = defaultdict(list)
    for t, group in enumerate(keys):
        for key in group:
            uses[key].append(t)
    cursor: dict[Key, int] = defaultdict(int)
    resident = set(warm[:capacity])
    misses = 0
    for group in keys:
        for key in group:
            cursor[key] += 1
        for key in group:
            if key in resident:
                continue
            misses += 1
            if len(resident) >= capacity:
                evictable = resident - set(group)
                if not evictable:  # the layer needs more experts than slots: it streams
                    continue
                resident.remove(max(evictable, key=lambda k: _next_use(uses[k], cursor[k])))
            resident.add(key)
    return misses


def _next_use(times: list[int], seen: int) -> float:
    return times[seen] if seen < len(times) else float("inf")
