"""What /metrics' values mean, on the engine's collectors alone (no model): each holds what its
help text and DESIGN §6 say, in the form Prometheus and the dashboards read it."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import HIT_WINDOW, EngineMetrics

FINISH_REASONS = ("stop", "length", "abort")  # what the engine sets (detokenizer, abort)


def offload_stats(hits: int, misses: int) -> dict[str, float]:
    """`OffloadRuntime.stats()` with only the lookups moving."""
    lookups = hits + misses
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / lookups if lookups else 0.0,
        "transfers": 0,
        "transfer_bytes": 0,
        "stall_seconds": 0.0,
        "prefetch_issued": 0,
        "prefetch_used": 0,
        "host_computes": 0,
        "prefetch_horizon": 1,
        "predictor_recall": 0.0,
        "resident_expert_bytes": 1024,
        "expert_cache_slots": 4,
    }


def samples(metrics: EngineMetrics) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def hit_ratio(metrics: EngineMetrics) -> float:
    key = ("expertflow_expert_cache_hit_ratio", frozenset({"model_name": "demo"}.items()))
    return samples(metrics)[key]


def test_request_success_exports_every_finish_reason_before_its_first_request() -> None:
    """A labelled child appears only once touched; a counter series that first appears at 1 loses
    that increase to rate() (and the "Finished requests/s by reason" panel shows nothing for a
    reason until its second request), so every reason starts at 0 as vLLM's do."""
    metrics = EngineMetrics("demo")
    exported = samples(metrics)
    for reason in FINISH_REASONS:
        key = frozenset({"model_name": "demo", "finished_reason": reason}.items())
        assert exported.get(("expertflow_request_success_total", key)) == 0.0, reason


def test_hit_ratio_covers_the_last_window_of_steps() -> None:
    """One miss, then HIT_WINDOW - 1 hits: the last HIT_WINDOW steps hold all of them."""
    metrics = EngineMetrics("demo")
    metrics.record_offload(offload_stats(0, 0), None)  # as the engine does once it is built
    metrics.record_offload(offload_stats(0, 1), 1)
    for step in range(1, HIT_WINDOW):
        metrics.record_offload(offload_stats(step, 1), 1)
    assert hit_ratio(metrics) == (HIT_WINDOW - 1) / HIT_WINDOW
    metrics.record_offload(offload_stats(HIT_WINDOW, 1), 1)  # the miss leaves the window
    assert hit_ratio(metrics) == 1.0
