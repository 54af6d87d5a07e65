"""Every refusal is an OpenAI error body with the right status, and the server serves on after it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

MAX_MODEL_LEN = 128
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_launcher: Callable
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("errors-server")
    with server_launcher(
        mixtral_checkpoint, folder, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4"
    ) as running:
        yield running


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": MESSAGES, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "hi", "max_tokens": 2, **fields}


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


TOOL_PARAMS = "tools[0].function.parameters"


def tool(parameters: dict[str, Any], name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def deep(levels: int) -> dict[str, Any]:
    """An object schema with `levels` levels of nesting."""
    value: dict[str, Any] = {"type": "object"}
    for _ in range(levels // 2):
        value = {"type": "object", "properties": {"a": value}}
    return value


def defs(kind: str) -> dict[str, Any]:
    return {
        "type": "object",
        "$defs": {"x": {"type": kind}},
        "properties": {"a": {"$ref": "#/$defs/x"}},
    }


def call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


# (path, body, status, param, words the message must contain)
BAD_REQUESTS = [
    (CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    (CHAT, {"max_tokens": 2}, 400, "messages", "required"),
    (CHAT, chat(max_tokens="ten"), 400, "max_tokens", "integer"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", "string"),
    (CHAT, chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role", "user"),
    (CHAT, chat(temperature=3), 400, "temperature", "between 0 and 2"),
    (CHAT, chat(top_p=0), 400, "top_p", "(0, 1]"),
    (CHAT, chat(n=0), 400, "n", "between 1"),
    (CHAT, chat(presence_penalty=5), 400, "presence_penalty", "between -2 and 2"),
    (CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", "above 0"),
    (CHAT, chat(min_p=1.5), 400, "min_p", "between 0 and 1"),
    (CHAT, chat(stop_token_ids=[10**6]), 400, "stop_token_ids", "must be in [0,"),
    (COMPLETIONS, completion(stop_token_ids=[-1]), 400, "stop_token_ids", "token ids"),
    (COMPLETIONS, completion(min_tokens=5), 400, "min_tokens", "between 0 and max_tokens"),
    (CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", "20"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", "logprobs"),
    (CHAT, chat(stop=7), 400, "stop", "string"),
    (CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    (CHAT, chat(tools=[TOOL]), 400, "tool_choice", "--enable-auto-tool-choice"),
    (CHAT, chat(tool_choice="required"), 400, "tool_choice", "needs `tools`"),
    (CHAT, chat(tools=[TOOL], tool_choice=named("g")), 400, "tool_choice", "not one of `tools`"),
    # a named choice short of its parts was "Input should be 'none', 'auto' or 'required'"
    (
        CHAT,
        chat(tools=[TOOL], tool_choice={"type": "function"}),
        400,
        "tool_choice",
        "`function` is missing",
    ),
    (
        CHAT,
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {}}),
        400,
        "tool_choice",
        "`function.name` is missing",
    ),
    (
        CHAT,
        chat(tools=[TOOL], tool_choice={"function": {"name": "f"}}),
        400,
        "tool_choice",
        '`type` must be "function"',
    ),
    (
        CHAT,
        chat(tools=[TOOL], tool_choice=5),
        400,
        "tool_choice",
        '"required" or {"type": "function"',
    ),
    (
        CHAT,
        chat(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}),
        400,
        "tool_choice",
        "response_format",
    ),
    (CHAT, chat(tools=[{"type": "function", "function": {}}]), 400, "tools[0].function.name", ""),
    (CHAT, chat(tools=[], tool_choice="none"), 400, "tools", "at least 1"),
    (CHAT, chat(tools=[tool(deep(40))], tool_choice="none"), 400, TOOL_PARAMS, "deeper than"),
    (CHAT, chat(tools=[tool({"type": "string"})], tool_choice="none"), 400, TOOL_PARAMS, "object"),
    # "required" lifts each tool's `$defs` to the top: one that is no object was a 500
    (CHAT, chat(tools=[tool({"$defs": "x"})], tool_choice="required"), 400, TOOL_PARAMS, "$defs"),
    (CHAT, chat(tools=[tool({"$defs": None})], tool_choice="required"), 400, TOOL_PARAMS, "$defs"),
    (
        CHAT,
        chat(tools=[tool(defs("int")), tool(defs("str"), "g")], tool_choice="required"),
        400,
        "tools",
        "$defs/x differently",
    ),
    (CHAT, chat(functions=[{"name": "f"}]), 400, "functions", "not supported"),
    (CHAT, chat(response_format={"type": "yaml"}), 400, "response_format.type", "json_schema"),
    (CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format", "required"),
    (
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
        400,
        "response_format.json_schema.name",
        "pattern",
    ),
    (
        COMPLETIONS,
        completion(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": []}}
        ),
        400,
        "response_format.json_schema.schema",
        "dictionary",
    ),
    (
        CHAT,
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/no"}}}},
            }
        ),
        400,
        "response_format",
        "invalid JSON schema: Cannot find field no",
    ),
    (CHAT, chat(logit_bias={"a": 10}), 400, "logit_bias", "token ids"),
    (CHAT, chat(logit_bias={"²": 10}), 400, "logit_bias", "token ids"),
    (CHAT, chat(logit_bias={"9" * 5000: 10}), 400, "logit_bias", "token ids"),
    (CHAT, chat(logit_bias={"5": 101}), 400, "logit_bias", "between -100 and 100"),
    (COMPLETIONS, completion(logit_bias={"5": "x"}), 400, "logit_bias.5", "number"),
    (COMPLETIONS, completion(logit_bias={"99999": 1}), 400, "logit_bias", "must be in [0,"),
    (CHAT, chat(messages=[{"role": "tool", "content": "4"}]), 400, "messages[0]", "tool_call_id"),
    (CHAT, chat(messages=[{"role": "function", "content": "4"}]), 400, "messages[0].role", "tool"),
    (
        CHAT,
        chat(messages=[{"role": "assistant", "tool_calls": [call("f", "{oops")]}]),
        400,
        "messages[0].tool_calls[0].function.arguments",
        "JSON",
    ),
    (CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0]", "`content` is required"),
    ("/tokenize", {"messages": []}, 400, "messages", "at least 1"),  # found by the fuzzer
    ("/tokenize", {"prompt": "x", "tools": [TOOL]}, 400, None, "with `messages` only"),
    (
        CHAT,
        chat(messages=[{"role": "assistant", "tool_calls": [call("f", json.dumps(deep(300)))]}]),
        400,
        "messages[0].tool_calls[0].function.arguments",
        "deeper than",
    ),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages[0].content",
        "text",
    ),  # fmt: skip
    (COMPLETIONS, completion(prompt=["a", [1, 2]]), 400, "prompt", "a list of strings or of"),
    (
        COMPLETIONS,
        completion(echo=True, logprobs=2, prompt_logprobs=-1),
        400,
        "prompt_logprobs",
        "greater than or equal to 0",
    ),
    (  # 128 prompts x 100 tokens x 21 x 4 choices: past the default 1,000,000 entries
        COMPLETIONS,
        completion(prompt=[[5] * 100] * 128, n=4, prompt_logprobs=20),
        400,
        "prompt_logprobs",
        "1075200 prompt logprob entries",
    ),
    (  # an echo with logprobs scores the prompt too
        COMPLETIONS,
        completion(prompt=[[5] * 100] * 128, n=4, echo=True, logprobs=20),
        400,
        "prompt_logprobs",
        "--max-prompt-logprobs",
    ),
    (
        COMPLETIONS,
        completion(structured_outputs={"regex": "(["}),
        400,
        "structured_outputs",
        "invalid regex",
    ),
    (
        COMPLETIONS,
        completion(structured_outputs={"regex": "a", "choice": ["b"]}),
        400,
        "structured_outputs",
        "exactly one",
    ),
    (
        CHAT,
        chat(response_format={"type": "json_object"}, structured_outputs={"choice": ["b"]}),
        400,
        "structured_outputs",
        "not both",
    ),
    (COMPLETIONS, completion(prompt=["a"] * 129), 400, "prompt", "at most 128"),
    (COMPLETIONS, completion(prompt=[[1, 2], []]), 400, "prompt", "a prompt is empty"),
    (COMPLETIONS, completion(prompt=[[5], [1, 10**6]]), 400, "prompt", "token ids must be in"),
    (COMPLETIONS, completion(prompt=5), 400, "prompt", "token ids"),
    (COMPLETIONS, completion(prompt=""), 400, "prompt", "empty"),
    (COMPLETIONS, completion(prompt=[1, 10**6]), 400, "prompt", "token ids must be in"),
    (COMPLETIONS, completion(suffix="end"), 400, "suffix", "not supported"),
    (COMPLETIONS, completion(prompt="\ud800"), 400, "prompt", "not valid Unicode"),
    (COMPLETIONS, completion(prompt=["ok", "a\udfff"]), 400, "prompt", "not valid Unicode"),
    ("/tokenize", {"prompt": "\udfff"}, 400, "prompt", "not valid Unicode"),
    (COMPLETIONS, completion(echo=True, max_tokens=0), 400, "max_tokens", "at least 1"),
    (COMPLETIONS, completion(best_of=2, n=1), 400, "best_of", "not supported"),
    (COMPLETIONS, completion(logprobs=99), 400, "logprobs", "between 0 and 20"),
    (COMPLETIONS, completion(model="nope"), 404, "model", "The model `nope` does not exist."),
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, None, "either"),
    ("/tokenize", {"prompt": "x", "model": "no\ud800"}, 404, "model", "`no\ud800` does not exist"),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens", "token ids must be in"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "list"),
    (CHAT, chat(model="nope", stream=True), 404, "model", "The model `nope` does not exist."),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), BAD_REQUESTS)
def test_bad_request(
    server: RunningServer, path: str, body: dict, status: int, param: str | None, words: str
) -> None:
    with server.http() as http:  # JSON escapes a lone surrogate, which httpx's `json=` cannot
        headers = {"content-type": "application/json"}
        response = http.post(path, content=json.dumps(body), headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert error["code"] == {400: 400, 404: "model_not_found"}[status]  # OpenAI's code for 404
    server.assert_alive()


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("stream", [False, True])
def test_context_length(server: RunningServer, path: str, stream: bool) -> None:
    body = chat(max_tokens=1000) if path == CHAT else completion(max_tokens=1000)
    with server.http() as http:
        response = http.post(path, json={**body, "stream": stream})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert str(MAX_MODEL_LEN) in error["message"] and "1000 in the completion" in error["message"]
    server.assert_alive()


@pytest.mark.parametrize(("path", "field"), [(CHAT, "messages"), (COMPLETIONS, "prompt")])
def test_prompt_longer_than_context(server: RunningServer, path: str, field: str) -> None:
    prompt = [{"role": "user", "content": "hi " * MAX_MODEL_LEN}] if path == CHAT else [5] * 200
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)) as no_room:
        server.client.post(path[3:], body={field: prompt, "max_tokens": None}, cast_to=dict)
    assert no_room.value.code == "context_length_exceeded" and no_room.value.param == field
    server.assert_alive()


def test_malformed_bodies(server: RunningServer) -> None:
    with server.http() as http:
        for content in (b'{"prompt": "hi",', b"[1, 2]", b""):
            response = http.post(
                COMPLETIONS, content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, (content, response.text)
            assert response.json()["error"]["type"] == "BadRequestError"
        assert (
            "Malformed JSON"
            in http.post(CHAT, content=b"{", headers={"content-type": "application/json"}).json()[
                "error"
            ]["message"]
        )
        form = http.post(COMPLETIONS, content=b'{"prompt": "hi"}', headers={"content-type": ""})
        assert form.status_code == 400 and "Content-Type: application/json" in form.text
        assert http.get(COMPLETIONS).status_code == 405
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    server.assert_alive()


def test_api_key(server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
        response = httpx.post(f"{server.url}{COMPLETIONS}", json=completion(), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 401
    # A missing key is a 401 even when the body is malformed too: the key is checked first.
    assert httpx.post(f"{server.url}{CHAT}", content=b"{").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").models.list()
    for open_path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{open_path}").status_code == 200
    server.assert_alive()
