"""The real server as a subprocess on a free port, over a tiny checkpoint; each test module starts
one (module-scoped fixture) with the flags it needs."""

from __future__ import annotations

import contextlib
import functools
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-key"
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    api_key: str | None
    model: str
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @functools.cached_property
    def client(self) -> openai.OpenAI:
        """One SDK client per server, so tests reuse its connections."""
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0
        )

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0
        )

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by their full text name, e.g. `expertflow_kv_cache_usage_ratio{...}`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none yet)."""
        total = 0.0
        for sample, value in self.metrics().items():
            base, _, rest = sample.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        """A request after an error: the server must keep serving."""
        assert self.process.poll() is None, self.log()[-3000:]
        out = self.client.completions.create(model=self.model, prompt="ok", max_tokens=1)
        assert out.usage.completion_tokens == 1


@contextlib.contextmanager
def launch_server(
    checkpoint: Path, log_dir: Path, *flags: str, api_key: str | None = API_KEY, model: str = "tiny"
) -> Iterator[RunningServer]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", model, *flags,
    ]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    log_path = log_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", api_key, model, log_path, process)
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="session")
def server_launcher() -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """`launch_server` for module-scoped fixtures (test modules do not import conftest)."""
    return launch_server
