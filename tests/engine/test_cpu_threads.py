"""On a CPU, offloaded experts leave one core to the link's thread, unless --cpu-threads says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, EngineConfig
from engine.offload import runtime
from tests.conftest import GreedyRun


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 4-core affinity with torch on all four; torch's own count restored after."""
    before = torch.get_num_threads()
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("four_cores")
def test_offloaded_experts_leave_a_core_to_the_link() -> None:
    runtime.set_cpu_threads(None, offloaded=False)
    assert torch.get_num_threads() == 4  # every expert resident: the link never wakes
    runtime.set_cpu_threads(None, offloaded=True)
    assert torch.get_num_threads() == 3


@pytest.mark.usefixtures("four_cores")
def test_fewer_threads_than_cores_and_the_flag_are_kept() -> None:
    torch.set_num_threads(2)  # torch on physical cores of a machine with hyperthreads, say
    runtime.set_cpu_threads(None, offloaded=True)
    assert torch.get_num_threads() == 2
    runtime.set_cpu_threads(4, offloaded=True)
    assert torch.get_num_threads() == 4


@pytest.mark.usefixtures("four_cores")
def test_the_engine_sets_them_when_it_offloads(
    mixtral_checkpoint: Path, greedy_run: GreedyRun
) -> None:
    greedy_run(mixtral_checkpoint, expert_cache_size=4)
    assert torch.get_num_threads() == 3
    greedy_run(mixtral_checkpoint, cpu_threads=1)
    assert torch.get_num_threads() == 1


def test_at_least_one_thread() -> None:
    with pytest.raises(ConfigError, match="cpu_threads must be >= 1"):
        EngineConfig(cpu_threads=0)
