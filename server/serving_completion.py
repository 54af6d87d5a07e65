"""/v1/completions: a text prompt (or token ids) straight into the engine, answered whole or as an
SSE stream of `text_completion` chunks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Response

from server.api_requests import CompletionRequest
from server.api_responses import Completion, CompletionChoice, Usage
from server.errors import APIError
from server.logprobs import completion_logprobs
from server.serving import DONE, Generation, OpenAIServing, sse, stream_error

logger = logging.getLogger(__name__)


class CompletionServing(OpenAIServing):
    id_prefix = "cmpl"

    async def create(self, request: CompletionRequest) -> Response | Completion:
        self.check_model(request.model)
        params = request.to_sampling_params()
        prompt = request.prompt
        prompt_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        request_id, created = self.new_request()
        generation = await Generation.start(
            self.engine, prompt_ids, params, request_id, self.policy
        )
        if request.stream:
            chunks = self._stream(generation, request_id, created, request.include_usage)
            return self.event_stream(chunks, request_id)
        final = await generation.final()
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
            usage=generation.usage(),
        )

    async def _stream(
        self, generation: Generation, request_id: str, created: int, include_usage: bool
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(
                Completion(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=choices,
                    usage=usage,
                )
            )

        text_offsets = [0] * len(generation.last.outputs)  # where each choice's next token starts
        try:
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
            if include_usage:
                yield chunk([], generation.usage())
        except APIError as exc:  # a timeout or shutdown: the client is told why, no traceback
            logger.warning("completion stream %s ended early: %s", request_id, exc.message)
            yield stream_error(exc)
        except Exception as exc:
            logger.exception("completion stream %s failed", request_id)
            yield stream_error(exc)
        yield DONE
