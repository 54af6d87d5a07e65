"""Clients that leave abort their requests: under load, every KV block comes back and the server
reports nothing running, as read from /metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

NUM_COMPLETE, NUM_LEAVE = 32, 8
COMPLETE_TOKENS, LONG_TOKENS = 24, 480  # a leaver would run for hundreds of steps if not aborted
ABORTS = "expertflow_request_success_total"


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_launcher: Callable
) -> Iterator[RunningServer]:
    flags = ("--max-model-len", "512", "--max-num-seqs", "48", "--kv-cache-blocks", "1600")
    with server_launcher(
        mixtral_checkpoint, tmp_path_factory.mktemp("load-server"), *flags
    ) as running:
        yield running


def wait_until_idle(server: RunningServer, aborts: float, timeout_s: float = 30.0) -> None:
    """Aborts land at the engine's next step boundary, so poll rather than read once."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = (
            server.metric("expertflow_num_requests_running"),
            server.metric("expertflow_kv_cache_usage_ratio"),
            server.metric(ABORTS, finished_reason="abort"),
        )
        if state == (0.0, 0.0, aborts):
            return
        assert time.monotonic() < deadline, (
            f"(running, kv usage, aborts) = {state}, want (0, 0, {aborts})"
        )
        time.sleep(0.2)


async def complete(server: RunningServer, i: int) -> tuple[list[str], int]:
    client = server.async_openai()
    stream = await client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": f"request {i}"}],
        max_tokens=COMPLETE_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finishes, completion_tokens = [], 0
    async for chunk in stream:
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        completion_tokens = chunk.usage.completion_tokens if chunk.usage else completion_tokens
    await client.close()
    return finishes, completion_tokens


async def leave_mid_stream(http: httpx.AsyncClient, i: int) -> int:
    body = {"prompt": f"long {i}", "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
    received = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # closing the unread response drops the connection
    return received


def test_streams_complete_while_others_disconnect(server: RunningServer) -> None:
    aborts = server.metric(ABORTS, finished_reason="abort")

    async def run() -> list:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=60
        ) as http:
            return await asyncio.gather(
                *(complete(server, i) for i in range(NUM_COMPLETE)),
                *(leave_mid_stream(http, i) for i in range(NUM_LEAVE)),
            )

    results = asyncio.run(run())
    assert results[:NUM_COMPLETE] == [(["length"], COMPLETE_TOKENS)] * NUM_COMPLETE
    assert results[NUM_COMPLETE:] == [3] * NUM_LEAVE
    wait_until_idle(server, aborts + NUM_LEAVE)
    server.assert_alive()


def test_non_streaming_disconnect_aborts(server: RunningServer) -> None:
    aborts = server.metric(ABORTS, finished_reason="abort")
    body = {"prompt": "long", "max_tokens": LONG_TOKENS, "ignore_eos": True}

    async def leave_once_running() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
            request = asyncio.create_task(http.post("/v1/completions", json=body, timeout=60))
            while server.metric("expertflow_num_requests_running") < 1:
                assert not request.done(), "the request ended before the client could leave"
                await asyncio.sleep(0.01)
            request.cancel()  # drops the connection while the server is still generating
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(leave_once_running())
    wait_until_idle(server, aborts + 1)
    server.assert_alive()
