"""/v1/chat/completions: messages through the chat template into the engine, answered whole or as
an SSE stream of `chat.completion.chunk` objects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Response

from engine import AsyncLLM, RequestOutput
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
from server.logprobs import chat_logprobs
from server.serving import Generation, OpenAIServing, RequestPolicy


class ChatServing(OpenAIServing[ChatCompletionRequest, ChatChunkChoice]):
    id_prefix = "chatcmpl"
    chunk_type = ChatCompletionChunk

    def __init__(
        self, engine: AsyncLLM, model_name: str, policy: RequestPolicy, renderer: ChatRenderer
    ) -> None:
        super().__init__(engine, model_name, policy)
        self.renderer = renderer

    async def create(self, request: ChatCompletionRequest) -> Response | ChatCompletion:
        self.check_model(request.model)
        params = request.to_sampling_params()
        prompt_ids = self.renderer.render([m.template_dict() for m in request.messages])
        return await self.respond(request, prompt_ids, params)

    def whole(
        self,
        request: ChatCompletionRequest,
        final: RequestOutput,
        usage: Usage,
        request_id: str,
        created: int,
    ) -> ChatCompletion:
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
            usage=usage,
        )

    async def chunks(
        self,
        request: ChatCompletionRequest,
        generation: Generation,
        chunk: Callable[[list[ChatChunkChoice]], str],
    ) -> AsyncIterator[str]:
        for index in range(len(generation.last.outputs)):  # each choice opens with its role
            yield chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
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
