"""/v1/chat/completions: messages through the chat template into the engine, answered whole or as
an SSE stream of `chat.completion.chunk` objects."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Response

from engine import AsyncLLM
from server.api_requests import ChatCompletionRequest
from server.api_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Delta,
    Usage,
)
from server.chat_template import ChatRenderer
from server.errors import APIError
from server.logprobs import chat_logprobs
from server.serving import DONE, Generation, OpenAIServing, RequestPolicy, sse, stream_error

logger = logging.getLogger(__name__)


class ChatServing(OpenAIServing):
    id_prefix = "chatcmpl"

    def __init__(
        self, engine: AsyncLLM, model_name: str, policy: RequestPolicy, renderer: ChatRenderer
    ) -> None:
        super().__init__(engine, model_name, policy)
        self.renderer = renderer

    async def create(self, request: ChatCompletionRequest) -> Response | ChatCompletion:
        self.check_model(request.model)
        params = request.to_sampling_params()
        prompt_ids = self.renderer.render([m.template_dict() for m in request.messages])
        request_id, created = self.new_request()
        generation = await Generation.start(
            self.engine, prompt_ids, params, request_id, self.policy
        )
        if request.stream:
            chunks = self._stream(generation, request_id, created, request.include_usage)
            return self.event_stream(chunks, request_id)
        final = await generation.final()
        return ChatCompletion(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=[
                ChatChoice(
                    index=o.index,
                    message=AssistantMessage(content=o.text),
                    logprobs=None if o.logprobs is None else chat_logprobs(o.logprobs),
                    finish_reason=o.finish_reason,
                )
                for o in final.outputs
            ],
            usage=generation.usage(),
        )

    async def _stream(
        self, generation: Generation, request_id: str, created: int, include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=choices,
                    usage=usage,
                )
            )

        for index in range(len(generation.last.outputs)):
            yield chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        try:
            async for deltas in generation.deltas():
                for d in deltas:
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=d.index,
                                delta=Delta(content=d.text or None),
                                logprobs=None if d.logprobs is None else chat_logprobs(d.logprobs),
                                finish_reason=d.finish_reason,
                            )
                        ]
                    )
            if include_usage:
                yield chunk([], generation.usage())
        except APIError as exc:  # a timeout or shutdown: the client is told why, no traceback
            logger.warning("chat stream %s ended early: %s", request_id, exc.message)
            yield stream_error(exc)
        except Exception as exc:
            logger.exception("chat stream %s failed", request_id)
            yield stream_error(exc)
        yield DONE
