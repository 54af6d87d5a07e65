"""A real Prometheus (Debian's package; `.ci/run` installs it) scrapes the server on loopback every
second while requests run; then every dashboard query, as Grafana would send it, must parse and
return series, and the hit-ratio and TTFT panels must return numbers a person can read."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.deploy.conftest import dashboard_targets, instantiate
from tests.server.conftest import free_port

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no `prometheus` binary: `apt-get install prometheus` (Debian), as .ci/run does",
)
READY_TIMEOUT_S = 30
TOKENS = "expertflow_generation_tokens_total"


@contextlib.contextmanager
def run_prometheus(target: str, folder: Path) -> Iterator[str]:
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: expertflow\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [
        str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn",
    ]  # fmt: skip
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(url):
            assert process.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    return False


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def wait_for(prometheus: str, expr: str, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while not (result := query(prometheus, expr)):
        assert time.monotonic() < deadline, f"no data for {expr}"
        time.sleep(0.5)
    return result


def numbers(result: list[dict[str, Any]]) -> list[float]:
    return [float(series["value"][1]) for series in result]


def test_dashboard_queries_through_prometheus(deploy_server: RunningServer, tmp_path: Path) -> None:
    target = deploy_server.url.removeprefix("http://")
    with run_prometheus(target, tmp_path) as prometheus:
        wait_for(prometheus, 'up{job="expertflow"} == 1')  # a scrape before the traffic
        for i in range(12):  # spread over a few scrapes, so rates see several increases
            deploy_server.client.completions.create(
                model=deploy_server.model, prompt=f"def f{i}(x):", max_tokens=12
            )
            time.sleep(0.2)
        model, generated = deploy_server.model, deploy_server.metric(TOKENS)
        wait_for(prometheus, f'{TOKENS}{{model_name="{model}"}} >= {generated}')  # scraped
        for dashboard, title, expr in dashboard_targets():
            assert query(prometheus, instantiate(expr, model)), f"{dashboard} / {title}: no data"
        for title, valid in (
            ("Expert cache hit ratio", lambda v: 0.0 <= v <= 1.0),
            ("Time to first token", lambda v: math.isfinite(v) and v > 0),
        ):
            for expr in (e for _, t, e in dashboard_targets() if t == title):
                (value,) = numbers(query(prometheus, instantiate(expr, model)))
                assert valid(value), (title, expr, value)
        labels = httpx.get(f"{prometheus}/api/v1/label/model_name/values", timeout=10).json()
        assert labels["data"] == [model]  # what the dashboard's model variable lists
