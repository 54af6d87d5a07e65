"""An unexpected engine exception fails only its own request (a 500, or an error event in a stream
that has started) and the app serves on. In-process, with an engine that breaks on purpose."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from engine import EngineConfig, RequestOutput, SamplingParams
from engine.outputs import CompletionOutput, RequestTiming
from server.app import ServerSettings, build_app


class BrokenEngine:
    """AsyncLLM's surface; `generate` yields one partial output, then fails like an engine bug."""

    def __init__(self, config: EngineConfig, model_name: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.max_model_len = 64
        self.metrics = SimpleNamespace(registry=CollectorRegistry())
        self.aborted: list[str] = []
        self.num_running = 0

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        partial = CompletionOutput(index=0, text="partial", token_ids=[5])
        yield RequestOutput(request_id, prompt_token_ids, [partial], False, RequestTiming(0.0))
        raise RuntimeError("engine exploded")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, mixtral_checkpoint: Path) -> Iterator[TestClient]:
    monkeypatch.setattr("server.app.AsyncLLM", BrokenEngine)
    app = build_app(EngineConfig(model=str(mixtral_checkpoint)), ServerSettings("tiny"))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_non_streaming_failure_is_a_500(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"prompt": "hi"})
    assert response.status_code == 500
    assert response.headers["connection"] == "close"  # uvicorn closes it after a 500
    error = response.json()["error"]
    assert error["type"] == "InternalServerError" and "engine exploded" in error["message"]
    assert client.get("/v1/models").status_code == 200


def test_streaming_failure_is_an_error_event(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    role, content, failure = (json.loads(e) for e in events[:-1])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content["choices"][0]["delta"] == {"content": "partial"}
    assert "engine exploded" in failure["error"]["message"]
    assert client.app.state.engine.aborted  # the stream's end always tells the engine
    assert client.get("/health").status_code == 200


def test_completion_streaming_failure_is_an_error_event(client: TestClient) -> None:
    body = {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    content, failure = (json.loads(e) for e in events[:-1])  # no usage chunk after a failure
    assert content["choices"][0]["text"] == "partial"
    assert "engine exploded" in failure["error"]["message"]
    assert client.get("/health").status_code == 200
