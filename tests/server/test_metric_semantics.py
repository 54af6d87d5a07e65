"""What /metrics' values mean, on the engine's collectors alone (no model): each holds what its
help text and DESIGN §6 say, in the form Prometheus and the dashboards read it."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import EngineMetrics

FINISH_REASONS = ("stop", "length", "abort")  # what the engine sets (detokenizer, abort)


def samples(metrics: EngineMetrics) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_request_success_exports_every_finish_reason_before_its_first_request() -> None:
    """A labelled child appears only once touched; a counter series that first appears at 1 loses
    that increase to rate() (and the "Finished requests/s by reason" panel shows nothing for a
    reason until its second request), so every reason starts at 0 as vLLM's do."""
    metrics = EngineMetrics("demo")
    exported = samples(metrics)
    for reason in FINISH_REASONS:
        key = frozenset({"model_name": "demo", "finished_reason": reason}.items())
        assert exported.get(("expertflow_request_success_total", key)) == 0.0, reason
