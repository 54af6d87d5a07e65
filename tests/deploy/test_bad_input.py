"""Hostile or broken request bodies get a 4xx whose message says what is wrong, never a 5xx, and
the server serves on: oversized bodies (declared or chunked), bytes that are not UTF-8, JSON
nested past any parser's depth, absurd n / max_tokens / seeds, negative, NaN and infinite numbers
(Python's json accepts NaN and Infinity literals, so they do reach validation)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MIB = 1 << 20
MESSAGES = '"messages": [{"role": "user", "content": "hi"}]'

# (path, raw JSON body, status, words the message must contain)
RAW_BODIES = [
    (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "UTF-8"),
    (COMPLETIONS, b'{"prompt": "hi", "max_tokens": 2', 400, "Malformed JSON"),
    (COMPLETIONS, b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (COMPLETIONS, b"", 400, "no body"),
    (CHAT, f'{{{MESSAGES}, "n": 1000000}}'.encode(), 400, "n must be between 1 and 128"),
    (CHAT, f'{{{MESSAGES}, "n": {10**40}}}'.encode(), 400, "n must be between 1 and 128"),
    (CHAT, f'{{{MESSAGES}, "max_tokens": {10**12}}}'.encode(), 400, "maximum context length"),
    (COMPLETIONS, f'{{"prompt": "hi", "max_tokens": {2**70}}}'.encode(), 400, "context length"),
    (COMPLETIONS, b'{"prompt": "hi", "max_tokens": -5}', 400, "max_tokens"),
    (CHAT, f'{{{MESSAGES}, "max_completion_tokens": 0}}'.encode(), 400, "greater than or equal"),
    (COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "hi", "temperature": -1}', 400, "temperature"),
    (COMPLETIONS, b'{"prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    (COMPLETIONS, b'{"prompt": "hi", "top_p": NaN}', 400, "top_p"),
    (CHAT, f'{{{MESSAGES}, "presence_penalty": -Infinity}}'.encode(), 400, "presence_penalty"),
    (CHAT, f'{{{MESSAGES}, "frequency_penalty": NaN}}'.encode(), 400, "frequency_penalty"),
    (COMPLETIONS, b'{"prompt": "hi", "top_k": -7}', 400, "top_k"),
    (COMPLETIONS, f'{{"prompt": "hi", "seed": {2**70}}}'.encode(), 400, "seed"),
    (COMPLETIONS, b'{"prompt": "hi", "logprobs": -1}', 400, "logprobs"),
    (COMPLETIONS, f'{{"prompt": [1, {2**40}]}}'.encode(), 400, "prompt token ids"),
    (COMPLETIONS, b'{"prompt": [1, -3]}', 400, "prompt token ids"),
    (COMPLETIONS, b'{"prompt": "hi", "stop": ["ok", ""]}', 400, "stop"),
]  # fmt: skip


def post(server: RunningServer, path: str, body: bytes | Iterator[bytes]) -> tuple[int, dict]:
    headers = {**server.headers, "Content-Type": "application/json"}
    with server.http() as http:
        response = http.post(path, content=body, headers=headers)
    return response.status_code, response.json()


def assert_error(status: int, body: dict, want_status: int, words: str) -> None:
    assert status == want_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize(("path", "body", "status", "words"), RAW_BODIES)
def test_bad_body_is_a_clear_4xx(
    deploy_server: RunningServer, path: str, body: bytes, status: int, words: str
) -> None:
    assert_error(*post(deploy_server, path, body), status, words)


def test_oversized_bodies_are_413(deploy_server: RunningServer) -> None:
    prompt = b'{"prompt": "' + b"a" * (2 * MIB) + b'"}'
    assert_error(*post(deploy_server, COMPLETIONS, prompt), 413, "exceeds 1048576 bytes")
    # Without Content-Length (chunked upload) the limit is counted as the body arrives.
    chunks = iter([b'{"prompt": "', *[b"a" * 65536] * 32, b'"}'])
    assert_error(*post(deploy_server, COMPLETIONS, chunks), 413, "--max-request-bytes")
    # Just under the limit is parsed as usual (and refused for its length, not its size).
    under = b'{"prompt": "' + b"ab " * ((MIB - 64) // 3) + b'"}'
    assert_error(*post(deploy_server, COMPLETIONS, under), 400, "maximum context length")
    deploy_server.assert_alive()
