"""The replay benchmark: its simulated link (priority order, no preemption, exact stall accounting),
the step schedules it replays, and host compute under its cost model."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from replay import Cost, replay, stream_steps, wave_steps  # noqa: E402
from sim_link import SimLink  # noqa: E402

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
    running, a, b = link.submit([], LOW), link.submit([], LOW), link.submit([], LOW)
    link.promote(b)
    link.wait(b)
    assert running.end_s == pytest.approx(1.0) and b.end_s == pytest.approx(2.0)
    assert a.end_s is None


def test_what_the_link_did_does_not_depend_on_how_often_it_was_asked() -> None:
    """A copy starts when the link frees up, whether or not anybody looked at the link then."""
    ends = []
    for poll in (False, True):
        link = SimLink(expert_bytes=100, bps=100.0)  # 1 s per copy
        low, later = link.submit([], LOW), link.submit([], LOW)
        link.now = 1.5  # `later` started at 1.0
        if poll:
            low.is_done()
        miss = link.submit([], HIGH)
        link.promote(later)  # too late: it is already on the link
        link.wait(miss)
        ends.append((later.end_s, miss.end_s))
    assert ends[0] == ends[1] == (pytest.approx(2.0), pytest.approx(3.0))


def test_wave_steps_follow_the_live_schedule() -> None:
    """Waves of `batch` documents: one prefill step of their prompts, then a token each per step."""
    doc_ids = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)  # 3 documents: 3 prompt + 2 decode tokens
    traces = SimpleNamespace(doc_ids=doc_ids, meta=SimpleNamespace(documents=("a", "b", "c")))
    steps = [s.tolist() for s in wave_steps(traces, batch=2, prompt_len=3)]  # type: ignore[arg-type]
    assert steps == [[0, 1, 2, 5, 6, 7], [3, 8], [4, 9], [10, 11, 12], [13], [14]]


def test_stream_steps_walk_side_by_side() -> None:
    rows = [s.tolist() for s in stream_steps(range(12), batch=3, steps=10)]  # type: ignore[arg-type]
    assert rows == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]


def test_host_compute_takes_misses_only_while_it_beats_the_link() -> None:
    g = torch.Generator().manual_seed(0)
    tokens, layers, experts = 150, 2, 8
    topk = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens * layers)])
    traces = SimpleNamespace(
        meta=SimpleNamespace(moe_layers=(0, 1), num_experts=experts, top_k=2),
        topk_ids=topk.view(tokens, layers, 2),
    )
    cost = Cost("test", expert_bytes=100, link_bps=100.0, layer_s=0.01)  # a copy: 1 s
    steps = [torch.tensor([t, t + 1]) for t in range(0, tokens - 1, 2)]  # batch 2
    lookups = sum(len(traces.topk_ids[s, i].unique()) for s in steps for i in range(layers))
    run = lambda host_s: replay(traces, cost, 0.5, "lru", "none", steps, host_s)  # noqa: E731
    copies, quick, slow = run(None), run(0.1), run(10.0)
    assert copies["host_computes"] == 0
    assert quick["host_computes"] > 0 and quick["stall_s"] < copies["stall_s"] / 2
    assert (
        slow["host_computes"] <= 4
    )  # 1 and 2 tokens each probed twice (the first run is not kept)
    assert quick["misses"] >= quick["host_computes"]
    assert copies["lookups"] == quick["lookups"] == slow["lookups"] == lookups


def test_offload_overhead_runs_the_real_cache_at_deepseek_scale() -> None:
    from offload_overhead import MODELS, measure

    r = measure(MODELS["deepseek-v3"], batch=8, ratio=0.25, policy="expertflow", steps=2)
    assert r["slots"] == 3712 and 0.0 < r["hit_rate"] < 1.0
    assert r["cache_us"] > 0 and r["prefetch_us"] > 0 and r["horizon"] >= 1
