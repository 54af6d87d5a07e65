"""What chat and completions share: starting a request's engine requests so that refusals are
400s, answering whole or as an SSE stream (usage, errors and [DONE] included), and aborting them
when the client goes away (server/generations.py follows them). An endpoint only says what its
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from engine import AsyncLLM, RequestError, RequestOutput, SamplingParams
from server.api_requests import SamplingRequest
from server.api_responses import Usage
from server.errors import APIError, error_body
from server.generations import Generations, RequestPolicy

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
    if isinstance(exc, RequestError):  # the request's own fault, found as it ran
        return sse(error_body(400, exc.message, exc.param, exc.code))
    return sse(error_body(500, f"Internal server error: {exc!r}"))


class PromptWorker:
    """Prepares prompts (chat templates, tokenizing) off the event loop: a long prompt keeps the
    tokenizer busy for a while (0.7 s for 1 MiB of text), and on the loop that stalled every
    stream and every other request. One thread, so the tokenizer still serves one call at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expertflow-prompts")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args)
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OpenAIServing(ABC, Generic[RequestT, ChoiceT]):
    """Base of the endpoint handlers: the served model's identity and the request's life, from the
    engine's first output to a whole answer or an SSE stream ending in [DONE]. An endpoint says
    how its answer and its chunks look."""

    id_prefix = "req"
    prompt_field = "prompt"  # the request field the engine's prompt comes from, for its refusals
    chunk_type: ClassVar[type[BaseModel]]  # what one stream event carries

    def __init__(
        self, engine: AsyncLLM, model_name: str, policy: RequestPolicy, prompts: PromptWorker
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.policy = policy
        self.prompts = prompts

    @abstractmethod
    def whole(
        self,
        request: RequestT,
        finals: list[RequestOutput],
        usage: Usage,
        request_id: str,
        created: int,
    ) -> BaseModel:
        """The non-streamed answer, from each prompt's final output."""

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
        self, request: RequestT, generations: Generations, chunk: Callable[[list[ChoiceT]], str]
    ) -> AsyncIterator[str]:
        """The stream's events for the generations' deltas, each made by `chunk(choices)`."""

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise APIError(
                404, f"The model `{requested}` does not exist.", "model", code="model_not_found"
            )

    def new_request(self) -> tuple[str, int]:
        """A fresh (id, created) pair; the id is also the engine's request id."""
        return f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    async def respond(
        self, request: RequestT, prompts: list[list[int]], params: SamplingParams
    ) -> Response | BaseModel:
        """Start the engine requests, one per prompt (their refusals raise here, as 400s, before
        any byte is sent), then answer whole or stream."""
        request_id, created = self.new_request()
        try:
            generations = await Generations.start(
                self.engine, prompts, params, request_id, self.policy
            )
        except RequestError as exc:  # a prompt the context has no room for: chat's `messages`
            if exc.param == "prompt":
                exc.param = self.prompt_field
            raise
        if not request.stream:
            finals = await generations.finals()
            return self.whole(request, finals, generations.usage(), request_id, created)
        events = self._events(request, generations, request_id, created)
        return self.event_stream(events, generations.request_ids)

    async def _events(
        self, request: RequestT, generations: Generations, request_id: str, created: int
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChoiceT]) -> str:  # vLLM's continuous usage: in every chunk
            usage = generations.usage() if request.continuous_usage else None
            return self.chunk(request_id, created, choices, usage)

        try:
            async for event in self.chunks(request, generations, chunk):
                yield event
            if request.include_usage:
                yield self.chunk(request_id, created, [], generations.usage())
        except (APIError, RequestError) as exc:  # a timeout, a shutdown, the request's fault
            logger.warning("stream %s ended early: %s", request_id, exc.message)
            yield stream_error(exc)
        except Exception as exc:
            logger.exception("stream %s failed", request_id)
            yield stream_error(exc)
        yield DONE

    def event_stream(self, chunks: AsyncIterator[str], request_ids: list[str]) -> StreamingResponse:
        # Starlette cancels the body on disconnect, which closes the engine streams and aborts the
        # requests; the background abort also covers a body cancelled between two chunks.
        async def abort() -> None:
            for request_id in request_ids:
                await self.engine.abort(request_id)

        return StreamingResponse(
            chunks, media_type="text/event-stream", background=BackgroundTask(abort)
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
