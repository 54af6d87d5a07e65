"""Offloading never changes outputs, and its statistics add up (DESIGN §4, §6)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from engine.offload import experts as experts_module

if TYPE_CHECKING:
    from tests.conftest import GreedyRun


CACHE_SETTINGS = [
    {"expert_cache_size": 1},  # smaller than one layer's top-k: experts stream through one slot
    {"expert_cache_ratio": 0.25},
    {"expert_cache_ratio": 0.5, "cache_policy": "lfu"},
    {"expert_cache_ratio": 0.5, "cache_policy": "lru", "link_gbps": 2.0},
    {"expert_cache_ratio": 0.75, "cache_policy": "lfu"},
]


def test_outputs_do_not_depend_on_the_cache(tiny_checkpoint: Path, greedy_run: GreedyRun) -> None:
    reference, llm = greedy_run(tiny_checkpoint, expert_cache_ratio=1.0)
    stats = llm.offload_stats()
    assert stats["misses"] == 0 and stats["transfers"] == 0
    for flags in CACHE_SETTINGS:
        tokens, llm = greedy_run(tiny_checkpoint, **flags)
        assert tokens == reference, flags
        assert llm.offload_stats()["misses"] > 0, flags


@pytest.mark.parametrize(
    "flags", CACHE_SETTINGS[:3], ids=["one-slot", "ratio-0.25", "ratio-0.5-lfu"]
)
def test_stats_are_consistent(
    mixtral_checkpoint: Path, flags: dict[str, object], greedy_run: GreedyRun
) -> None:
    _, llm = greedy_run(mixtral_checkpoint, **flags)
    stats = llm.offload_stats()
    offload = llm.engine.offload
    assert stats["hits"] + stats["misses"] == sum(offload.experts.activated_per_step)
    assert stats["transfer_bytes"] == stats["transfers"] * offload.store.expert_bytes
    assert stats["transfers"] == stats["misses"]  # no prefetching: every transfer is a miss
    assert 0.0 <= stats["hit_rate"] <= 1.0
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / (stats["hits"] + stats["misses"]))
    one_layer = offload.store.num_experts * offload.store.expert_bytes
    ratio = flags.get("expert_cache_ratio", 0.0)
    assert stats["resident_expert_bytes"] <= ratio * stats["total_expert_bytes"] + one_layer
    assert stats["mean_activated_experts_per_step"] > 0
    assert all(p == 0 for p in offload.cache.pins), "a slot stayed pinned after its layer ran"


def test_step_history_is_bounded_and_stats_cover_every_step(
    mixtral_checkpoint: Path, greedy_run: GreedyRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server steps for ever: the per-step record keeps only the latest steps, while the stats
    (read every step) still cover every step since start, from running totals."""
    _, whole = greedy_run(mixtral_checkpoint, expert_cache_ratio=0.25)
    monkeypatch.setattr(experts_module, "STEP_HISTORY", 3)
    _, llm = greedy_run(mixtral_checkpoint, expert_cache_ratio=0.25)
    experts, stats = llm.engine.offload.experts, llm.offload_stats()
    assert len(whole.engine.offload.experts.activated_per_step) > 3
    assert len(experts.activated_per_step) == 3
    assert stats == whole.offload_stats() | {"stall_seconds": stats["stall_seconds"]}
    assert stats["hits"] + stats["misses"] == experts.activated_total
