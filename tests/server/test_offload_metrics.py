"""The server's /metrics shows the offload metrics moving while requests run with a partial cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server.conftest import RunningServer


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_launcher: Callable
) -> Iterator[RunningServer]:
    flags = ("--max-model-len", "256", "--expert-cache-ratio", "0.5", "--predictor", "pregate",
             "--cache-policy", "expertflow")  # fmt: skip
    with server_launcher(
        mixtral_checkpoint, tmp_path_factory.mktemp("offload-server"), *flags
    ) as s:
        yield s


def test_offload_metrics_move_during_requests(server: RunningServer) -> None:
    slots = server.metric("expertflow_expert_cache_slots")
    assert slots == 8  # half of 2 layers x 8 experts, exported before any request
    assert server.metric("expertflow_expert_cache_resident_bytes") > 0
    before = {
        name: server.metric(name)
        for name in (
            "expertflow_expert_cache_hits_total",
            "expertflow_expert_cache_misses_total",
            "expertflow_expert_transfers_total",
            "expertflow_expert_transfer_bytes_total",
            "expertflow_prefetch_issued_total",
            "expertflow_activated_experts_per_step_count",
        )
    }
    for i in range(3):
        server.client.completions.create(model=server.model, prompt=f"def f{i}(x):", max_tokens=16)
    for name, value in before.items():
        assert server.metric(name) > value, name
    assert 0 < server.metric("expertflow_expert_cache_hit_ratio") <= 1
    assert server.metric("expertflow_prefetch_horizon") >= 1
    assert server.metric("expertflow_expert_stall_seconds_total") >= 0
