"""/v1/completions: a text prompt (or token ids) straight into the engine, answered whole or as an
SSE stream of `text_completion` chunks. With `echo` each choice's text starts with the prompt, and
with `logprobs` too its logprobs start with the prompt tokens' (the first has none): what
evaluation harnesses use to score a text under the model."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Response

from engine import RequestOutput
from engine.outputs import TokenLogprob
from server.api_requests import CompletionRequest
from server.api_responses import Completion, CompletionChoice, CompletionLogprobs, Usage
from server.generations import Generations
from server.logprobs import completion_logprobs, prompt_logprobs
from server.serving import OpenAIServing


@dataclass(frozen=True)
class Echo:
    """What an echoing choice starts with: the prompt's text and, when logprobs are asked for,
    the prompt tokens' entries (the first a bare token: nothing precedes it to score it)."""

    text: str
    logprobs: list[TokenLogprob | str] | None

    def join(
        self, text: str, logprobs: list[TokenLogprob] | None
    ) -> tuple[str, CompletionLogprobs | None, int]:
        """The echo followed by a choice's first text and logprobs, and the text offset after
        them. Offsets run on over the prompt's token texts into the generated ones (as vLLM's),
        so they never go back even where those texts do not add up to the prompt's text."""
        if self.logprobs is None:
            return self.text + text, None, 0
        prompt, end = completion_logprobs(self.logprobs, 0)
        generated, offset = completion_logprobs(logprobs or [], end)
        joined = CompletionLogprobs(
            tokens=prompt.tokens + generated.tokens,
            token_logprobs=prompt.token_logprobs + generated.token_logprobs,
            top_logprobs=prompt.top_logprobs + generated.top_logprobs,
            text_offset=prompt.text_offset + generated.text_offset,
        )
        return self.text + text, joined, offset


class CompletionServing(OpenAIServing[CompletionRequest, CompletionChoice]):
    id_prefix = "cmpl"
    chunk_type = Completion

    async def create(self, request: CompletionRequest) -> Response | Completion:
        self.check_model(request.model)
        params = request.to_sampling_params()
        encode = self.engine.tokenizer.encode
        prompts = [
            await self.prompts.run(encode, p) if isinstance(p, str) else p for p in request.prompts
        ]
        return await self.respond(request, prompts, params)

    def echo(self, request: CompletionRequest, output: RequestOutput, p: int) -> Echo | None:
        """What prompt `p`'s choices start with, when the request echoes."""
        if not request.echo:
            return None
        ids, prompt = output.prompt_token_ids, request.prompts[p]
        text = prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(ids)
        if request.logprobs is None or output.prompt_logprobs is None:
            return Echo(text, None)
        # Complete by now: the engine answers only after the whole prompt has been prefilled.
        scored = output.prompt_logprobs[1:]
        assert all(e is not None for e in scored), "prompt logprobs arrive with the first token"
        k = request.logprobs  # the engine scored the best max(logprobs, prompt_logprobs)
        trimmed = [dataclasses.replace(e, top=e.top[:k]) for e in scored if e is not None]
        return Echo(text, [self.engine.token_text(ids[0]), *trimmed])

    def whole(
        self,
        request: CompletionRequest,
        finals: list[RequestOutput],
        usage: Usage,
        request_id: str,
        created: int,
    ) -> Completion:
        choices = []
        for p, final in enumerate(finals):
            echo = self.echo(request, final, p)
            scores = None
            if request.prompt_logprobs is not None and final.prompt_logprobs is not None:
                scores = prompt_logprobs(final.prompt_logprobs, request.prompt_logprobs)
            for o in final.outputs:
                if echo is not None:
                    text, logprobs, _ = echo.join(o.text, o.logprobs)
                else:
                    text = o.text
                    logprobs = None if o.logprobs is None else completion_logprobs(o.logprobs, 0)[0]
                index = p * len(final.outputs) + o.index
                choices.append(
                    CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=o.finish_reason,
                        prompt_logprobs=scores,
                    )
                )
        return Completion(
            id=request_id, created=created, model=self.model_name, choices=choices, usage=usage
        )

    async def chunks(
        self,
        request: CompletionRequest,
        generations: Generations,
        chunk: Callable[[list[CompletionChoice]], str],
    ) -> AsyncIterator[str]:
        echoes = [self.echo(request, last, p) for p, last in enumerate(generations.lasts)]
        n = generations.n
        text_offsets = [0] * (n * len(echoes))  # where each choice's next token starts in its text
        echoed = [echo is None for echo in echoes for _ in range(n)]  # rides on a first chunk
        async for deltas in generations.deltas():
            for d in deltas:
                text, logprobs = d.text, None
                if not echoed[d.index]:
                    echo = echoes[d.index // n]
                    assert echo is not None
                    text, logprobs, text_offsets[d.index] = echo.join(d.text, d.logprobs)
                    echoed[d.index] = True
                elif d.logprobs is not None:
                    logprobs, text_offsets[d.index] = completion_logprobs(
                        d.logprobs, text_offsets[d.index]
                    )
                yield chunk(
                    [
                        CompletionChoice(
                            index=d.index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                        )
                    ]
                )
