"""The serving limits, on servers slowed down on purpose (two expert slots behind an emulated
1 MB/s link: a token takes about 0.1 s) so that requests are reliably still running when a limit
strikes: the waiting queue's 429, the per-request timeout, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from server.errors import APIError
from server.limits import WEIGHT, Limits, RequestLimitMiddleware
from tests.deploy.conftest import sse_events
from tests.server.conftest import launch_server

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

SLOW = ("--max-model-len", "512", "--expert-cache-size", "2", "--link-gbps", "0.001")
TIMEOUT_S, GRACE_S = 3.0, 2.0
LONG = {"prompt": "long", "max_tokens": 400, "ignore_eos": True}
ABORTS = "expertflow_request_success_total"


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    flags = (*SLOW, "--max-num-seqs", "1", "--max-waiting-requests", "2",
             "--request-timeout", str(TIMEOUT_S))  # fmt: skip
    with launch_server(mixtral_checkpoint, tmp_path_factory.mktemp("limits"), *flags) as running:
        yield running


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def idle(server: RunningServer) -> bool:
    return (
        server.metric("expertflow_num_requests_running"),
        server.metric("expertflow_num_requests_waiting"),
        server.metric("expertflow_kv_cache_usage_ratio"),
    ) == (0.0, 0.0, 0.0)


async def first_event(http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[Any, Any]:
    """Opens a stream and reads its first event; returns (the open stream, its event iterator)."""
    stream = http.stream("POST", "/v1/completions", json={**body, "stream": True})
    response = await stream.__aenter__()
    assert response.status_code == 200
    events = sse_events(response)
    await anext(events)
    return stream, events


def test_full_waiting_queue_is_429(server: RunningServer) -> None:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=60
        ) as http:
            running, _ = await first_event(http, LONG)
            waiting = [
                asyncio.ensure_future(http.post("/v1/completions", json=LONG)) for _ in range(2)
            ]
            await asyncio.to_thread(
                wait_for, lambda: server.metric("expertflow_num_requests_waiting") == 2, "queue"
            )
            refused = await http.post("/v1/completions", json=LONG)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await running.__aexit__(None, None, None)
            return refused

    refused = asyncio.run(run())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert (
        error["code"] == "too_many_waiting_requests"
        and "--max-waiting-requests 2" in error["message"]
    )
    wait_for(lambda: idle(server), "idle after the queue emptied")
    server.assert_alive()


def test_a_batch_takes_a_place_per_prompt(server: RunningServer) -> None:
    """A completions batch waits as one engine request per prompt: with one request running
    and two places, a batch of two fills the queue (so the next request is refused), its places
    come back with its response, and a batch of three, more than the queue holds, is a 400."""

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=60
        ) as http:
            running, _ = await first_event(http, LONG)
            batch = asyncio.ensure_future(
                http.post("/v1/completions", json={**LONG, "prompt": ["a", "b"]})
            )
            await asyncio.to_thread(
                wait_for, lambda: server.metric("expertflow_num_requests_waiting") == 2, "batch"
            )
            behind = await http.post("/v1/completions", json=LONG)
            batch.cancel()
            await asyncio.gather(batch, return_exceptions=True)
            await running.__aexit__(None, None, None)
            return behind

    behind = asyncio.run(run())
    assert behind.status_code == 429 and behind.headers["Retry-After"] == "1"
    wait_for(lambda: idle(server), "idle after the batch left")
    after = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": ["a", "b"], "max_tokens": 1},
        headers=server.headers,
        timeout=60,
    )
    assert after.status_code == 200 and len(after.json()["choices"]) == 2
    never = httpx.post(  # more prompts than the whole queue holds: no retry would help
        f"{server.url}/v1/completions",
        json={"prompt": ["a", "b", "c"], "max_tokens": 1},
        headers=server.headers,
        timeout=60,
    )
    assert never.status_code == 400 and never.json()["error"]["param"] == "prompt"
    server.assert_alive()


def test_a_batch_that_does_not_fit_now_is_429_and_its_places_come_back() -> None:
    """The limiter alone, three places: a batch of three needs two more than its own."""
    limiter = RequestLimitMiddleware(None, Limits(max_waiting_requests=3), lambda: 0)  # type: ignore[arg-type]
    limiter.in_flight = 3  # this batch's own place, and two waiting requests
    scope: dict[str, Any] = {}
    with pytest.raises(APIError) as info:
        limiter.admit_batch(scope, 3)
    assert info.value.status == 429 and info.value.headers == {"Retry-After": "1"}
    assert limiter.in_flight == 3 and WEIGHT not in scope
    limiter.in_flight = 1  # the batch alone
    limiter.admit_batch(scope, 3)
    assert limiter.in_flight == 3 and scope[WEIGHT] == 3


def test_timeout_aborts_whole_and_streamed_requests(server: RunningServer) -> None:
    aborts = server.metric(ABORTS, finished_reason="abort")

    async def run() -> tuple[httpx.Response, list[Any], float]:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=60
        ) as http:
            start = time.monotonic()
            stream, events = await first_event(http, LONG)
            whole = asyncio.ensure_future(http.post("/v1/completions", json=LONG))  # waits its turn
            rest = [event async for event in events]
            await stream.__aexit__(None, None, None)
            return await whole, rest, time.monotonic() - start

    whole, rest, elapsed = asyncio.run(run())
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 5
    assert whole.status_code == 504 and whole.json()["error"]["code"] == "request_timeout"
    *chunks, error, done = rest
    assert done == "[DONE]" and error["error"]["code"] == "request_timeout", rest[-2:]
    assert "--request-timeout" in error["error"]["message"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    wait_for(lambda: idle(server), "KV freed after the timeouts")
    assert server.metric(ABORTS, finished_reason="abort") == aborts + 2
    server.assert_alive()


def test_sigterm_finishes_short_requests_and_aborts_long_ones(
    mixtral_checkpoint: Path, tmp_path: Path
) -> None:
    flags = (*SLOW, "--graceful-shutdown-timeout", str(GRACE_S))
    with launch_server(mixtral_checkpoint, tmp_path, *flags) as server:

        async def run() -> tuple[list[Any], list[Any], float]:
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=60
            ) as http:
                long_stream, long_events = await first_event(http, LONG)
                short_stream, short_events = await first_event(http, {**LONG, "max_tokens": 3})
                server.process.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                short = [event async for event in short_events]
                long = [event async for event in long_events]
                aborted_after = time.monotonic() - sent
                for stream in (short_stream, long_stream):
                    await stream.__aexit__(None, None, None)
                # no longer listening: refused, or (racing the listener's close) reset unread
                with pytest.raises((httpx.ConnectError, httpx.ReadError)):
                    await http.get("/health")
                return short, long, aborted_after

        short, long, aborted_after = asyncio.run(run())
        assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
        *_, error, done = long
        assert done == "[DONE]" and error["error"]["code"] == "server_shutting_down", long[-2:]
        assert GRACE_S <= aborted_after < GRACE_S + 3
        server.process.wait(timeout=15)
        assert (
            "timeout graceful shutdown exceeded" not in server.log()
        )  # uvicorn never cut a stream
