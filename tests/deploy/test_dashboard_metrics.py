"""Every metric a dashboard queries is one a running server exports, under the exact sample name
Prometheus stores (prometheus_client writes a counter NAME as NAME_total and a histogram as
NAME_bucket/_sum/_count), with the `model_name` label; and each is used as its type allows: rate()
over counters and histogram buckets only, gauges read as they are. A renamed metric or a typo in
a dashboard fails here instead of drawing an empty panel."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import METRIC, dashboard_targets

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

RATE_ARGUMENT = re.compile(r"\brate\(\s*(expertflow_[a-z0-9_]+)")


def exported_samples(server: RunningServer) -> dict[str, tuple[str, set[str]]]:
    """Sample name -> (its family's type, the label names it carries)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, (family.type, set()))[1].update(sample.labels)
    return samples


def test_dashboard_metrics_are_exported(deploy_server: RunningServer) -> None:
    # Labelled children such as request_success{finished_reason} appear only once used.
    deploy_server.client.completions.create(model=deploy_server.model, prompt="x", max_tokens=3)
    samples = exported_samples(deploy_server)
    targets = dashboard_targets()
    assert targets
    for dashboard, title, expr in targets:
        rated = set(RATE_ARGUMENT.findall(expr))
        for name in METRIC.findall(expr):
            where = f"{dashboard} / {title}: {name}"
            assert name in samples, f"{where} is not exported by /metrics"
            kind, labels = samples[name]
            assert "model_name" in labels, f"{where} has no model_name label"
            if name in rated:
                assert kind in ("counter", "histogram"), f"{where}: rate() over a {kind}"
            else:
                assert kind == "gauge", f"{where}: a {kind} read without rate()"
