"""/v1/chat/completions: messages (and tools) through the chat template into the engine, answered
whole or as an SSE stream of `chat.completion.chunk` objects, with reasoning and tool calls parsed
out of the text (server/chat_answer.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

from fastapi import Response

from engine import AsyncLLM, RequestOutput, SamplingParams
from server.api_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Delta,
    Usage,
)
from server.chat_answer import ChatFormats, ChoiceStream, answer, grammar_after_reasoning
from server.chat_requests import ChatCompletionRequest
from server.chat_template import ChatRenderer
from server.errors import APIError
from server.generations import Generations, RequestPolicy
from server.logprobs import chat_logprobs, prompt_logprobs
from server.serving import OpenAIServing, PromptWorker


class ChatServing(OpenAIServing[ChatCompletionRequest, ChatChunkChoice]):
    id_prefix = "chatcmpl"
    prompt_field = "messages"
    chunk_type = ChatCompletionChunk

    def __init__(
        self,
        engine: AsyncLLM,
        model_name: str,
        policy: RequestPolicy,
        prompts: PromptWorker,
        renderer: ChatRenderer,
        formats: ChatFormats = ChatFormats(),
    ) -> None:
        super().__init__(engine, model_name, policy, prompts)
        self.renderer, self.formats = renderer, formats

    async def create(self, request: ChatCompletionRequest) -> Response | ChatCompletion:
        self.check_model(request.model)
        auto = request.effective_tool_choice == "auto"
        if auto and self.formats.tools is None:
            raise APIError(
                400,
                '"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                "--tool-call-parser; or name a function, or use 'required' or 'none'",
                param="tool_choice",
            )
        params = sampling_params(request, self.formats)
        tools = [t.model_dump(exclude_none=True) for t in request.tools or ()] or None
        messages = [m.template_dict() for m in request.messages]
        options = request.template_options()
        prompt = await self.prompts.run(self.renderer.render, messages, tools, options)
        if self.formats.reasoning is not None:
            start = await self.prompts.run(
                self.renderer.answer_start, messages, tools, options, prompt.text
            )
            request.reasoning_open = self.formats.reasoning.starts_open(start)
            params = grammar_after_reasoning(params, request, self.formats.reasoning)
        return await self.respond(request, [prompt.token_ids], params)

    def whole(
        self,
        request: ChatCompletionRequest,
        finals: list[RequestOutput],
        usage: Usage,
        request_id: str,
        created: int,
    ) -> ChatCompletion:
        [final] = finals
        choices = []
        for o in final.outputs:
            result = answer(request, self.formats, o.text, o.finish_reason)
            message = AssistantMessage(
                reasoning=result.reasoning, content=result.content, tool_calls=result.tool_calls
            )
            choices.append(
                ChatChoice(
                    index=o.index,
                    message=message,
                    logprobs=None if o.logprobs is None else chat_logprobs(o.logprobs),
                    finish_reason=result.finish_reason,
                )
            )
        scores = None
        if request.prompt_logprobs is not None and final.prompt_logprobs is not None:
            scores = prompt_logprobs(final.prompt_logprobs, request.prompt_logprobs)
        return ChatCompletion(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=usage,
            prompt_logprobs=scores,
        )

    async def chunks(
        self,
        request: ChatCompletionRequest,
        generations: Generations,
        chunk: Callable[[list[ChatChunkChoice]], str],
    ) -> AsyncIterator[str]:
        n = generations.n
        for index in range(n):  # each choice opens with its role
            yield chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
        streams = [ChoiceStream(request, self.formats) for _ in range(n)]
        async for deltas in generations.deltas():
            for d in deltas:
                choice = streams[d.index].advance(d)
                if choice is not None:
                    yield chunk([choice])


def sampling_params(request: ChatCompletionRequest, formats: ChatFormats) -> SamplingParams:
    """The request's own, except that markers the parsers read that are special tokens must
    reach the text: a call's start with tool_choice "auto", and gpt-oss's harmony always."""
    params = request.to_sampling_params()
    auto = request.effective_tool_choice == "auto"
    calls = auto and formats.tools is not None and formats.tools.keep_special_tokens
    if calls or (formats.reasoning is not None and formats.reasoning.keep_special_tokens):
        params = dataclasses.replace(params, skip_special_tokens=False)
    return params
