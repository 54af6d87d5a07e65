"""/v1/completions: a text prompt (or token ids) straight into the engine, answered whole or as an
SSE stream of `text_completion` chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Response

from engine import RequestOutput
from server.api_requests import CompletionRequest
from server.api_responses import Completion, CompletionChoice, Usage
from server.logprobs import completion_logprobs
from server.serving import Generation, OpenAIServing


class CompletionServing(OpenAIServing[CompletionChoice]):
    id_prefix = "cmpl"
    chunk_type = Completion

    async def create(self, request: CompletionRequest) -> Response | Completion:
        self.check_model(request.model)
        params = request.to_sampling_params()
        prompt = request.prompt
        prompt_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return await self.respond(prompt_ids, params, request.stream, request.include_usage)

    def whole(
        self, final: RequestOutput, usage: Usage, request_id: str, created: int
    ) -> Completion:
        return Completion(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=[
                CompletionChoice(
                    index=o.index,
                    text=o.text,
                    logprobs=None if o.logprobs is None else completion_logprobs(o.logprobs, 0)[0],
                    finish_reason=o.finish_reason,
                )
                for o in final.outputs
            ],
            usage=usage,
        )

    async def chunks(
        self, generation: Generation, chunk: Callable[[list[CompletionChoice]], str]
    ) -> AsyncIterator[str]:
        text_offsets = [0] * len(generation.last.outputs)  # where each choice's next token starts
        async for deltas in generation.deltas():
            for d in deltas:
                logprobs = None
                if d.logprobs is not None:
                    logprobs, text_offsets[d.index] = completion_logprobs(
                        d.logprobs, text_offsets[d.index]
                    )
                yield chunk(
                    [
                        CompletionChoice(
                            index=d.index,
                            text=d.text,
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                        )
                    ]
                )
