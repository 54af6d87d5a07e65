"""The replay benchmark's simulated link: priority order, no preemption, exact stall accounting."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from replay import SimLink  # noqa: E402

from engine.offload.transfer import HIGH, LOW  # noqa: E402


def test_misses_overtake_queued_prefetches_but_not_a_running_one() -> None:
    link = SimLink(expert_bytes=100, bps=100.0)  # 1 s per copy
    first, second = link.submit([], LOW), link.submit([], LOW)
    link.now = 0.5
    miss = link.submit([], HIGH)
    link.wait(miss)  # `first` holds the link until 1.0, then the miss runs 1.0 -> 2.0
    assert link.now == pytest.approx(2.0) and link.stall_s == pytest.approx(1.5)
    assert first.end_s == pytest.approx(1.0) and not second.is_done()
    link.wait(second)
    assert second.end_s == pytest.approx(3.0) and link.stall_s == pytest.approx(2.5)


def test_a_finished_copy_costs_no_stall() -> None:
    link = SimLink(expert_bytes=50, bps=100.0)
    transfer = link.submit([], LOW)
    link.now = 2.0
    assert transfer.is_done()
    link.wait(transfer)
    assert link.stall_s == 0.0


def test_promotion_moves_a_queued_prefetch_ahead() -> None:
    link = SimLink(expert_bytes=100, bps=100.0)
    a, b = link.submit([], LOW), link.submit([], LOW)
    link.promote(b)
    link.wait(b)
    assert b.end_s == pytest.approx(1.0) and a.end_s is None
