"""What chat and completions share: starting an engine request so that refusals are 400s, following
it as per-choice deltas within its time limit, answering whole or as an SSE stream (usage, errors
and [DONE] included), and aborting it when the client goes away. An endpoint only says what its
answer and its chunks look like."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from engine import AsyncLLM, RequestOutput, SamplingParams
from engine.outputs import TokenLogprob
from server.api_requests import SamplingRequest
from server.api_responses import PromptTokensDetails, Usage
from server.errors import APIError, error_body

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"
T = TypeVar("T")
RequestT = TypeVar("RequestT", bound=SamplingRequest)
ChoiceT = TypeVar("ChoiceT", bound=BaseModel)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left before the answer"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def stream_error(exc: Exception) -> str:
    """Headers are gone once a stream starts, so a late failure travels as an error event."""
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param, exc.code))
    return sse(error_body(500, f"Internal server error: {exc!r}"))


@dataclass
class RequestPolicy:
    """What every generation of the server obeys: its time limit, and the flag the server sets
    when it aborts what is left of its requests at shutdown (they fail with 503, not 500)."""

    timeout_s: float | None = None
    shutting_down: bool = False


@dataclass
class ChoiceDelta:
    index: int
    text: str
    logprobs: list[TokenLogprob] | None  # the new tokens' logprobs; None when not requested
    finish_reason: str | None


class Generation:
    """One engine request as an endpoint sees it, started before the first response byte."""

    def __init__(self, outputs: AsyncIterator[RequestOutput], policy: RequestPolicy) -> None:
        loop_time = asyncio.get_running_loop().time()
        deadline = None if policy.timeout_s is None else loop_time + policy.timeout_s
        self._outputs = self._follow(outputs, policy, deadline)
        self.last: RequestOutput

    @classmethod
    async def start(
        cls,
        engine: AsyncLLM,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        policy: RequestPolicy,
    ) -> Generation:
        """Waits for the first output: the engine raises its refusals (RequestError) only here."""
        generation = cls(engine.generate(prompt_token_ids, params, request_id), policy)
        generation.last = await anext(generation._outputs)
        return generation

    @staticmethod
    async def _follow(
        outputs: AsyncIterator[RequestOutput], policy: RequestPolicy, deadline: float | None
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs until the deadline. Past it the wait is cancelled, which closes the
        engine stream and so aborts the request and frees its KV blocks. The deadline covers each
        wait for the engine only, never a yield, so it cannot cancel the caller's own writes."""
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    out = await anext(outputs)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise APIError(
                    504,
                    f"The request ran longer than the server's limit of {policy.timeout_s:g} s "
                    "(--request-timeout) and was aborted.",
                    code="request_timeout",
                ) from None
            except Exception as exc:
                if not policy.shutting_down:
                    raise
                raise APIError(
                    503,
                    "The server shut down before the request finished; it was aborted.",
                    code="server_shutting_down",
                ) from exc
            yield out

    async def final(self) -> RequestOutput:
        async for out in self._outputs:
            self.last = out
        return self.last

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """What each choice gained since the previous output. Engine outputs are cumulative and
        never retract text, so deltas concatenate to the final text; each choice's finish_reason
        is reported exactly once, with its last delta."""
        n = len(self.last.outputs)
        sent_chars, sent_tokens, done = [0] * n, [0] * n, [False] * n

        async def outputs() -> AsyncIterator[RequestOutput]:
            yield self.last
            async for out in self._outputs:
                self.last = out
                yield out

        async for out in outputs():
            batch = []
            for choice in out.outputs:
                i = choice.index
                if done[i]:
                    continue
                text = choice.text[sent_chars[i] :]
                logprobs = None if choice.logprobs is None else choice.logprobs[sent_tokens[i] :]
                if not (text or logprobs or choice.finish_reason):
                    continue
                sent_chars[i], sent_tokens[i] = len(choice.text), len(choice.logprobs or ())
                done[i] = choice.finish_reason is not None
                batch.append(ChoiceDelta(i, text, logprobs, choice.finish_reason))
            if batch:
                yield batch

    def usage(self) -> Usage:
        """Exact counts: completion tokens are summed over the n choices, as OpenAI does."""
        prompt = len(self.last.prompt_token_ids)
        completion = self.last.num_generated_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.last.num_cached_tokens),
        )


class OpenAIServing(ABC, Generic[RequestT, ChoiceT]):
    """Base of the endpoint handlers: the served model's identity and the request's life, from the
    engine's first output to a whole answer or an SSE stream ending in [DONE]. An endpoint says
    how its answer and its chunks look."""

    id_prefix = "req"
    chunk_type: ClassVar[type[BaseModel]]  # what one stream event carries

    def __init__(self, engine: AsyncLLM, model_name: str, policy: RequestPolicy) -> None:
        self.engine = engine
        self.model_name = model_name
        self.policy = policy

    @abstractmethod
    def whole(
        self, request: RequestT, final: RequestOutput, usage: Usage, request_id: str, created: int
    ) -> BaseModel:
        """The non-streamed answer."""

    def chunk(
        self, request_id: str, created: int, choices: list[ChoiceT], usage: Usage | None = None
    ) -> str:
        """One SSE event of the stream: a `chunk_type` object."""
        return sse(
            self.chunk_type(
                id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
            )
        )

    @abstractmethod
    def chunks(
        self, request: RequestT, generation: Generation, chunk: Callable[[list[ChoiceT]], str]
    ) -> AsyncIterator[str]:
        """The stream's events for the generation's deltas, each made by `chunk(choices)`."""

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(404, f"The model `{requested}` does not exist.", param="model")

    def new_request(self) -> tuple[str, int]:
        """A fresh (id, created) pair; the id is also the engine's request id."""
        return f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    async def respond(
        self, request: RequestT, prompt_ids: list[int], params: SamplingParams
    ) -> Response | BaseModel:
        """Start the engine request (its refusals raise here, as 400s, before any byte is sent),
        then answer whole or stream."""
        request_id, created = self.new_request()
        generation = await Generation.start(
            self.engine, prompt_ids, params, request_id, self.policy
        )
        if not request.stream:
            final = await generation.final()
            return self.whole(request, final, generation.usage(), request_id, created)
        events = self._events(request, generation, request_id, created)
        return self.event_stream(events, request_id)

    async def _events(
        self, request: RequestT, generation: Generation, request_id: str, created: int
    ) -> AsyncIterator[str]:
        try:
            async for event in self.chunks(
                request, generation, functools.partial(self.chunk, request_id, created)
            ):
                yield event
            if request.include_usage:
                yield self.chunk(request_id, created, [], generation.usage())
        except APIError as exc:  # a timeout or shutdown: the client is told why, no traceback
            logger.warning("stream %s ended early: %s", request_id, exc.message)
            yield stream_error(exc)
        except Exception as exc:
            logger.exception("stream %s failed", request_id)
            yield stream_error(exc)
        yield DONE

    def event_stream(self, chunks: AsyncIterator[str], request_id: str) -> StreamingResponse:
        # Starlette cancels the body on disconnect, which closes the engine stream and aborts the
        # request; the background abort also covers a body cancelled between two chunks.
        return StreamingResponse(
            chunks,
            media_type="text/event-stream",
            background=BackgroundTask(self.engine.abort, request_id),
        )


async def until_disconnected(request: Request, handler: Awaitable[T]) -> T | Response:
    """Runs a handler unless the client leaves first (vLLM's `with_cancellation`). Cancelling the
    handler closes its engine stream, which aborts the request and frees its KV blocks."""
    work = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        logger.info("client disconnected from %s; request aborted", request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
