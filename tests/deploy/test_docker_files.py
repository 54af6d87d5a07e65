"""docker/ read the way docker, compose, Prometheus and Grafana will read it, without a daemon:
every file a service mounts or the image copies exists, names and ports agree across files, and
every `expertflow serve` flag they pass is one the real parser accepts."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import parse_args
from tests.deploy.conftest import DASHBOARDS, DOCKER, METRIC, REPO

PANELS = (
    "Expert cache hit ratio", "Expert cache misses/s", "Expert stall seconds/s",
    "Expert transfer GB/s", "Resident expert bytes", "Prefetch accuracy (used / issued)",
    "Prefetch horizon and predictor recall", "Activated experts per step", "Time to first token",
    "Time per output token", "Output tokens/s", "Requests running / waiting", "KV cache usage",
)  # fmt: skip


DEMO_MODEL = "models/expertflow-demo"


class ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags (`!reset`, `!override`) become {"!tag": value} instead of errors."""


ComposeLoader.add_multi_constructor("!", lambda loader, tag, node: {f"!{tag}": node.value})


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def serve_flags_parse(flags: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The image runs from the repository's copy (WORKDIR), so relative --config paths resolve there."""
    monkeypatch.chdir(REPO)
    parse_args(["serve", *flags])


def test_compose_services_ports_and_volumes(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = load_yaml(DOCKER / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"expertflow", "prometheus", "grafana"}
    server = services["expertflow"]
    assert (DOCKER / server["build"]["context"]).resolve() == REPO
    assert (REPO / server["build"]["dockerfile"]).is_file()
    assert server["ports"] == ["8000:8000"]
    (gpu,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    serve_flags_parse(server["command"], monkeypatch)
    assert services["prometheus"]["ports"] == ["9090:9090"]
    assert services["grafana"]["ports"] == ["3000:3000"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_cpu_override_drops_the_gpu_and_runs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    override = load_yaml(DOCKER / "docker-compose.cpu.yml")["services"]["expertflow"]
    assert set(override["deploy"]) == {"!reset"}
    monkeypatch.chdir(REPO)
    assert parse_args(["serve", *override["command"]]).device == "cpu"


def test_prometheus_scrapes_the_compose_server() -> None:
    config = load_yaml(DOCKER / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["expertflow:8000"]}]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run(
            [promtool, "check", "config", str(DOCKER / "prometheus.yml")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_provisioning_matches_compose_and_dashboards() -> None:
    grafana = load_yaml(DOCKER / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provisioning = DOCKER / "grafana" / "provisioning"
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "expertflow.yml")["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DOCKER / "grafana" / "dashboards" / Path(home).name).is_file()
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        assert variables["datasource"]["current"]["value"] == source["uid"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert METRIC.search(variables["model_name"]["definition"])
    graphs = [p for p in panels if p["type"] != "row"]
    assert set(PANELS) <= {p["title"] for p in graphs}
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"] and panel["targets"], panel["title"]
        for target in panel["targets"]:
            selectors = METRIC.findall(target["expr"])
            assert selectors, (panel["title"], target["expr"])
            # every selector is filtered by the model variable, so the panel is per model
            count = target["expr"].count('{model_name=~"$model_name"}')
            assert count == len(selectors), (panel["title"], target["expr"])


def test_dockerfile(monkeypatch: pytest.MonkeyPatch) -> None:
    instructions = dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, args in instructions:
        by_name.setdefault(name, []).append(args)
    assert "cuda" in by_name["ARG"][0] and by_name["FROM"] == ["${BASE_IMAGE}"]
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["expertflow", "serve", "--host", "0.0.0.0"]
    serve_flags_parse(json.loads(by_name["CMD"][-1]), monkeypatch)
    assert by_name["USER"][-1] not in ("root", "0")
    assert by_name["EXPOSE"] == ["8000"]
    assert by_name["HEALTHCHECK"][-1].endswith(
        'CMD ["python", "/usr/local/bin/expertflow-healthcheck"]'
    )
    ignored = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    sources = [source for args in by_name["COPY"] for source in args.split()[:-1]]
    assert DEMO_MODEL in sources
    for source in sources:
        assert source == DEMO_MODEL or (REPO / source).exists(), f"COPY {source}: missing"
        assert not dockerignored(source, ignored), f"COPY {source}: excluded by .dockerignore"


@pytest.mark.skipif(
    not (REPO / DEMO_MODEL / "config.json").is_file(),
    reason=f"{DEMO_MODEL} is not in this checkout yet (scripts/train_demo_model.py makes it)",
)
def test_image_default_model_is_a_checkpoint() -> None:
    """The image COPYs the demo model as its default --model; a build needs it in the checkout."""
    assert list((REPO / DEMO_MODEL).glob("*.safetensors"))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(fnmatch.fnmatch(c, pattern.lstrip("!")) for c in candidates):
            excluded = not negated
    return excluded


def test_image_healthcheck_probes_the_served_port() -> None:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        script = [sys.executable, str(DOCKER / "healthcheck.py")]
        env = {**os.environ, "EXPERTFLOW_PORT": str(httpd.server_address[1])}
        assert subprocess.run(script, env=env).returncode == 0
        httpd.shutdown()
    env["EXPERTFLOW_PORT"] = str(httpd.server_address[1])  # closed now
    assert subprocess.run(script, env=env, capture_output=True).returncode == 1
