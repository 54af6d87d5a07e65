"""EF-25's adaptive horizon rule: S = ceil(N_e * E_s / (B * T_l)), corrected by stall/over-fetch streaks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine import LLM
from engine.offload.horizon import HorizonController


def controller(
    bandwidth_bps: float, expert_bytes: int, layer_time_s: float = 1e-3
) -> HorizonController:
    h = HorizonController(max_horizon=8, expert_bytes=expert_bytes)
    h.observe_transfer(int(bandwidth_bps), 1.0)
    h.observe_layer_time(layer_time_s)
    return h


def test_formula() -> None:
    # 4 experts x 1 MB over 1 GB/s = 4 ms of copies, 1 ms per layer -> 4 layers ahead.
    assert controller(1e9, 1_000_000).horizon(4) == 4


def test_slower_link_or_larger_experts_look_further_ahead() -> None:
    base = controller(2e9, 500_000).horizon(4)
    assert controller(0.5e9, 500_000).horizon(4) > base
    assert controller(2e9, 2_000_000).horizon(4) > base
    assert controller(2e9, 500_000, layer_time_s=0.25e-3).horizon(4) > base


def test_stall_streak_raises_and_overfetch_streak_lowers() -> None:
    h = controller(1e9, 500_000)
    start = h.horizon(4)
    for _ in range(h.streak_len):
        h.observe_layer(stalled=True, overfetched=False)
    assert h.horizon(4) == start + 1
    for _ in range(2 * h.streak_len):
        h.observe_layer(stalled=False, overfetched=True)
    assert h.horizon(4) == start - 1


def test_a_broken_streak_does_not_count() -> None:
    h = controller(1e9, 500_000)
    start = h.horizon(4)
    for stalled in (True, True, False, True, True):
        h.observe_layer(stalled=stalled, overfetched=False)
    assert h.horizon(4) == start


def test_bounds_hold() -> None:
    h = controller(1e6, 10_000_000)  # hopeless link: clamp to the last layer
    assert h.horizon(64) == h.max_horizon
    for _ in range(100):
        h.observe_layer(stalled=False, overfetched=True)
    assert h.horizon(64) >= 1
    fast = controller(1e15, 1)
    for _ in range(100):
        fast.observe_layer(stalled=False, overfetched=True)
    assert fast.horizon(1) == 1
    assert HorizonController(max_horizon=3, expert_bytes=1, fixed=10).horizon(1) == 3


def test_a_fixed_horizon_past_the_layers_is_clamped_with_a_warning(
    mixtral_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--prefetch-horizon 99 on the tiny Mixtral's 2 MoE layers was silently 1, within the auto
    rule's bounds; now it says so once, at start."""
    with caplog.at_level(logging.WARNING, logger="engine.offload.horizon"):
        llm = LLM(
            model=str(mixtral_checkpoint),
            max_model_len=64,
            predictor="pregate",
            prefetch_horizon="99",
        )
    layers = len(llm.engine.model_config.moe_layers)
    horizon = llm.engine.offload.prefetcher.horizon
    assert horizon.horizon(1) == layers - 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "engine.offload.horizon"]
    assert warnings == [
        f"prefetch_horizon=99: the model has {layers} MoE layers, so prefetches look at most "
        f"{layers - 1} ahead"
    ]
    caplog.clear()
    HorizonController(max_horizon=3, expert_bytes=1, fixed=3)
    assert not caplog.records


def test_unmeasured_starts_one_layer_ahead() -> None:
    assert HorizonController(max_horizon=5, expert_bytes=1000).horizon(8) == 1


def test_link_budget_is_what_the_link_moves_in_time() -> None:
    h = controller(1e9, 1_000_000, layer_time_s=2e-3)  # two copies per layer of compute
    assert h.link_budget(3) == 6
    slow = controller(1e8, 1_000_000, layer_time_s=1e-3)  # a copy takes ten layers
    assert slow.link_budget(3) == 1  # one copy at a time, never a queue ahead of the misses
    assert HorizonController(max_horizon=3, expert_bytes=1).link_budget(2) is None


def test_a_prefetch_pays_only_when_a_right_guess_saves_more_than_a_wrong_one_costs() -> None:
    one_layer = controller(1e9, 1_000_000, layer_time_s=1e-3)  # a copy takes one layer
    assert one_layer.pays(1, 0.6) and not one_layer.pays(1, 0.4)
    twenty = controller(1e9, 20_000_000, layer_time_s=1e-3)  # a copy takes twenty layers
    assert not twenty.pays(1, 0.9) and twenty.pays(1, 0.99)
    assert twenty.pays(5, 0.85) and not twenty.pays(5, 0.75)  # more lead, more saved
    assert HorizonController(max_horizon=3, expert_bytes=1).pays(1, 0.0)  # nothing measured yet
