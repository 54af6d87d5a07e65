"""What keeps one client from hurting the others: a cap on request bodies (413), a bounded queue of
requests waiting for the engine (429 with Retry-After), a time limit per request, and how long a
shutdown waits for requests in flight. The first two are an ASGI middleware, so they answer before
any JSON is parsed; the time limit is enforced where generations are followed (server.serving)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
RETRY_AFTER_S = 1  # the queue drains a request per finished generation: retry soon, not never
LIMITER, WEIGHT = "expertflow.limiter", "expertflow.weight"  # ASGI scope keys


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 1 << 20
    max_waiting_requests: int = 256
    request_timeout_s: float | None = None  # None: a request may run as long as it generates
    graceful_shutdown_s: float = 5.0
    # prompt logprob entries a request may ask for: each is built in the server's memory, n times
    max_prompt_logprobs: int = 1_000_000


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits")
    group.add_argument(
        "--max-request-bytes",
        type=_at_least(1, int),
        default=Limits.max_request_bytes,
        help="larger request bodies get 413",
    )
    group.add_argument(
        "--max-waiting-requests",
        type=_at_least(1, int),
        default=Limits.max_waiting_requests,
        help="generation requests admitted but not yet running, at most; more get 429",
    )
    group.add_argument(
        "--request-timeout",
        type=_at_least(0.001, float),
        help="seconds a generation request may take before it is aborted (504; a stream ends with "
        "an error event) (default: no limit)",
    )
    group.add_argument(
        "--max-prompt-logprobs",
        type=_at_least(0, int),
        default=Limits.max_prompt_logprobs,
        help="prompt logprob entries a request may ask for (prompt tokens x (k + 1) x n, summed "
        "over its prompts, with prompt_logprobs or echo with logprobs); more get 400",
    )
    group.add_argument(
        "--graceful-shutdown-timeout",
        type=_at_least(0.0, float),
        default=Limits.graceful_shutdown_s,
        help="seconds SIGTERM waits for requests in flight before aborting them",
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(
        args.max_request_bytes,
        args.max_waiting_requests,
        args.request_timeout,
        args.graceful_shutdown_timeout,
        args.max_prompt_logprobs,
    )


def _at_least(low: float, kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not low <= value < math.inf:  # NaN too; an infinite grace crashed DrainingServer's int()
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


class RequestLimitMiddleware:
    """413 for a body over `max_request_bytes` (by Content-Length, or counted as it arrives when
    chunked), 429 for a generation request when `max_waiting_requests` are already waiting. Waiting
    means admitted here and not finished, minus what the engine runs: requests still being parsed
    or queued in the engine's inbox count too, so a burst cannot slip past an engine that has not
    seen it yet. A request stays counted until its response (a whole stream) is sent. A
    completions batch of P prompts is P engine requests: its handler takes P - 1 more places
    (`admit_batch`, which the limiter puts in the request's scope)."""

    def __init__(self, app: ASGIApp, limits: Limits, num_running: Callable[[], int]) -> None:
        self.app, self.limits, self.num_running = app, limits, num_running
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.limits.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, first = 0, None
        while first is None:  # buffered here (at most `cap` bytes): a chunked body is capped too
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left: the app sees that as its first message
                continue
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replay = _replay(first, receive)
        if scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, replay, send)
            return
        waiting = self.in_flight - self.num_running()
        if waiting >= self.limits.max_waiting_requests:
            response = error_response(429, self._busy(waiting), code="too_many_waiting_requests")
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            await response(scope, replay, send)
            return
        self.in_flight += 1
        scope[LIMITER] = self
        try:
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= scope.get(WEIGHT, 1)

    def admit_batch(self, scope: Scope, prompts: int) -> None:
        """Take the places of a batch's other prompts (429 if they are not free), given back
        with the response."""
        cap, waiting = self.limits.max_waiting_requests, self.in_flight - self.num_running()
        if prompts > cap:
            raise APIError(
                400,
                f"{prompts} prompts would never fit the server's queue of {cap} "
                "(--max-waiting-requests): send fewer per request",
                param="prompt",
            )
        if prompts > 1 and waiting + prompts - 1 > cap:
            raise APIError(
                429,
                self._busy(waiting),
                code="too_many_waiting_requests",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.in_flight += prompts - 1
        scope[WEIGHT] = prompts

    def _busy(self, waiting: int) -> str:
        return (
            f"The server is busy: {waiting} requests are waiting for the engine "
            f"(--max-waiting-requests {self.limits.max_waiting_requests}). Retry shortly."
        )

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"The request body exceeds {self.limits.max_request_bytes} bytes "
            "(--max-request-bytes).",
            code="request_too_large",
        )
        await response(scope, receive, send)


def _replay(first: Message, receive: Receive) -> Receive:
    """The buffered body as one message, then the client's own messages (its disconnect)."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
