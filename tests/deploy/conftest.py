"""One server for the deployment tests that only send traffic (dashboards, Prometheus, load, bad
input, fuzzing): the real CLI over a tiny Mixtral with half of its experts cached and a predictor,
so that every offload metric a dashboard plots moves. Tests that reconfigure or stop a server
start their own."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import RunningServer, launch_server

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DASHBOARDS = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))
OFFLOAD_FLAGS = ("--expert-cache-ratio", "0.5", "--predictor", "pregate", "--cache-policy", "expertflow")  # fmt: skip
METRIC = re.compile(r"\bexpertflow_[a-z0-9_]+")


@pytest.fixture(scope="package")
def deploy_server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    flags = ("--max-model-len", "256", "--max-num-seqs", "64", *OFFLOAD_FLAGS)
    with launch_server(mixtral_checkpoint, tmp_path_factory.mktemp("deploy"), *flags) as server:
        yield server


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) of every query of every dashboard."""
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            found += [(path.name, panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return found


def instantiate(expr: str, model: str, rate_interval: str = "30s") -> str:
    """A dashboard query as Grafana would send it, for one model."""
    return expr.replace("$model_name", model).replace("$__rate_interval", rate_interval)


async def sse_events(response: httpx.Response) -> AsyncIterator[Any]:
    """The JSON payloads of an SSE response's events, `[DONE]` kept as the string. Events are split
    on blank lines only: httpx's aiter_lines also splits on U+0085 and U+2028, which a model may
    generate inside a JSON string (JSON leaves them unescaped)."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        *events, buffer = (buffer + chunk).split(b"\n\n")
        for event in events:
            data = event.decode().removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)
