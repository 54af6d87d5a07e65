"""Schemathesis fuzzes every operation of the server's own OpenAPI schema, with bodies that follow
it and bodies that break it: no answer is a 5xx, every refusal is an OpenAI error body, and the
server is alive afterwards. Bounded for CI: a fixed number of examples per mode, derandomized so a
failure reproduces, and generation lengths capped (n, max_tokens) since long valid generations test
the engine's speed, not the HTTP face; huge values are covered by test_bad_input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (pyproject's test extras list it)"
)
EXAMPLES_PER_MODE = 60
CAPS = {"n": 2, "max_tokens": 8, "max_completion_tokens": 8}


def capped(body: Any) -> Any:
    """Valid but long generations shortened; every other field stays as generated."""
    if isinstance(body, dict):
        for field, cap in CAPS.items():
            value = body.get(field)
            if type(value) is int and value > cap:
                body[field] = cap
    return body


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_openapi_schema(deploy_server: RunningServer, mode: str) -> None:
    schema = schemathesis.openapi.from_url(f"{deploy_server.url}/openapi.json")
    strategy = schema.as_strategy(schemathesis.GenerationMode(mode))

    @settings(
        max_examples=EXAMPLES_PER_MODE,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        case.body = capped(case.body)
        response = case.call(base_url=deploy_server.url, headers=deploy_server.headers, timeout=60)
        where = f"{case.method} {case.path} {case.body!r:.300}"
        assert response.status_code < 500, f"{where} -> {response.status_code} {response.text:.300}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, where

    fuzz()
    deploy_server.assert_alive()
