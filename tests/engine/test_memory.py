"""Sizing the expert cache to the GPU's memory (engine/memory.py), with a stand-in probe on the CPU:
the profile steps run for real on every family, the arithmetic is checked to the slot, and the
outputs stay those of an all-resident cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

import engine.llm_engine as llm_engine
from engine import LLM
from engine.config import ConfigError, EngineConfig
from engine.memory import memory_probe
from engine.offload.cache import ExpertCache

if TYPE_CHECKING:
    from tests.conftest import GreedyRun

MiB = 1 << 20


class FakeProbe:
    """A GPU of `total` bytes with `held` in use besides the provisional pool, whose profile
    steps peak at `activations` bytes."""

    def __init__(self, total: int, held: int, pool: int, activations: int) -> None:
        self.total, self.used, self.activations = total, held + pool, activations
        self.profiled = 0

    def peak_during(self, run: Callable[[], None]) -> int:
        run()
        self.profiled += 1
        return self.activations

    def used_and_total(self) -> tuple[int, int]:
        return self.used, self.total


def install(monkeypatch: pytest.MonkeyPatch, probe: FakeProbe) -> None:
    """The engine reads `probe` wherever it would read a GPU (no cache size given)."""

    def fake(config: EngineConfig) -> FakeProbe | None:
        sized = config.expert_cache_ratio is not None or config.expert_cache_size is not None
        return None if sized else probe

    monkeypatch.setattr(llm_engine, "memory_probe", fake)


def slot_bytes(checkpoint: Path) -> tuple[int, int, int]:
    """One slot's bytes, the experts of one layer and of all layers."""
    engine = LLM(model=str(checkpoint), max_model_len=64, expert_cache_size=1).engine
    store = engine.offload.store
    return engine.offload.cache.resident_bytes, store.num_experts, store.num_total_experts


def test_the_cpu_keeps_every_expert_without_a_probe() -> None:
    assert memory_probe(EngineConfig()) is None
    engine = LLM(max_model_len=64).engine
    assert engine.offload.cache.num_slots == engine.offload.store.num_total_experts


def test_the_slots_take_what_the_budget_leaves(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, greedy_run: GreedyRun
) -> None:
    per_slot, per_layer, total_experts = slot_bytes(tiny_checkpoint)
    wanted = total_experts // 2 + 1
    held, activations = 37 * MiB, 5 * MiB
    total = int((held + activations + wanted * per_slot + per_slot // 2) / 0.9)
    probe = FakeProbe(total, held, per_layer * per_slot, activations)
    install(monkeypatch, probe)
    tokens, llm = greedy_run(tiny_checkpoint)
    engine = llm.engine
    assert probe.profiled == 1
    assert engine.offload.cache.num_slots == wanted == engine.config.expert_cache_size
    assert engine.blocks.num_used == 0  # the profile's blocks and states went back
    states = engine.runner.states
    assert states is None or states.num_free == engine.config.max_num_seqs
    reference, _ = greedy_run(tiny_checkpoint, expert_cache_ratio=1.0)
    assert tokens == reference


def test_statistics_start_after_the_profile(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The profile steps' misses on the provisional pool are not the server's."""
    per_slot, per_layer, total_experts = slot_bytes(mixtral_checkpoint)
    probe = FakeProbe(10 * total_experts * per_slot, 0, per_layer * per_slot, 0)
    install(monkeypatch, probe)
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=64, link_gbps=100.0)
    stats = llm.offload_stats()
    assert stats["expert_cache_slots"] == total_experts  # all fit
    assert stats["misses"] == stats["transfers"] == stats["hits"] == 0
    assert stats["stall_seconds"] == 0.0


def test_a_budget_without_room_for_one_slot_is_refused(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_slot, per_layer, _ = slot_bytes(mixtral_checkpoint)
    held = 100 * MiB
    install(monkeypatch, FakeProbe(int(held / 0.9), held, per_layer * per_slot, 4 * MiB))
    with pytest.raises(ConfigError, match="no expert slot fits"):
        LLM(model=str(mixtral_checkpoint), max_model_len=64)


def test_slots_that_do_not_fit_name_the_flags(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(self: ExpertCache, *args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ExpertCache, "__init__", out_of_memory)
    with pytest.raises(ConfigError, match="do not fit in GPU memory.*--expert-cache-ratio"):
        LLM(model=str(mixtral_checkpoint), max_model_len=64, expert_cache_ratio=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fills_the_allowed_share(tiny_checkpoint: Path, greedy_run: GreedyRun) -> None:
    reference, _ = greedy_run(tiny_checkpoint, device="cuda", expert_cache_ratio=1.0)
    tokens, llm = greedy_run(tiny_checkpoint, device="cuda", gpu_memory_utilization=0.9)
    assert tokens == reference
    free, total = torch.cuda.mem_get_info()
    assert total - free <= 0.9 * total or llm.offload_stats()["expert_cache_slots"] == (
        llm.engine.offload.store.num_total_experts
    )


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_utilization_is_a_fraction(value: float) -> None:
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=value)
