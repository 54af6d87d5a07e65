"""What the expert cache counts: lookups (hits and misses), copies, and what became of prefetches;
`OffloadRuntime.stats` reports them, the server's /metrics exports them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CacheStats:
    """Counters since start; a lookup is one (step, layer, distinct expert)."""

    hits: int = 0
    misses: int = 0
    transfers: int = 0
    transfer_bytes: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0  # prefetched, then evicted unused
    prefetch_late: int = 0  # prefetched, still copying when its layer needed it
    host_computes: int = 0  # misses computed on the host instead of waiting for a copy
