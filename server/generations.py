"""Following a request's engine requests: `Generation` turns one engine stream into per-choice
deltas within the request's time limit (504 past it, 503 at shutdown); `Generations` starts one
per prompt of the request and numbers their choices across them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine import AsyncLLM, RequestOutput, SamplingParams
from engine.outputs import TokenLogprob
from server.api_responses import PromptTokensDetails, Usage
from server.errors import APIError

T = TypeVar("T")


@dataclass
class RequestPolicy:
    """What every generation of the server obeys: its time limit, and the flag the server sets
    when it aborts what is left of its requests at shutdown (they fail with 503, not 500)."""

    timeout_s: float | None = None
    shutting_down: bool = False
    max_prompt_logprobs: int | None = None  # entries a request may ask for (server.limits)


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


async def _all_or_none(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Every coroutine's result, in order. At the first failure (an error, or a member
    cancelled by someone else) the rest are cancelled and awaited, then the failure of the
    first failed member, in order, is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        pending: set[asyncio.Future[T]] = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in tasks if t.done() and (t.cancelled() or t.exception())]
            if failed and failed[0].cancelled():
                raise RuntimeError("an engine request of the batch was cancelled")
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _check_prompt_logprobs(
    prompts: list[list[int]], params: SamplingParams, limit: int | None
) -> None:
    """400 for a request whose prompt logprobs would outgrow `limit` entries. They are built
    whole, in the server's memory, once per choice (as vLLM's answer repeats them): 128 prompts
    of 900 tokens at n=128 and k=20 would take hundreds of GB and end the server."""
    k = params.prompt_logprobs
    if k is None or limit is None:
        return
    entries = sum(map(len, prompts)) * (k + 1) * params.n
    if entries > limit:
        raise APIError(
            400,
            f"The request asks for {entries} prompt logprob entries (prompt tokens x (k + 1) x n, "
            f"with prompt_logprobs or echo with logprobs); this server allows {limit} "
            "(--max-prompt-logprobs). Send fewer prompts, a smaller n or k.",
            param="prompt_logprobs",
        )


class Generations:
    """A request's engine requests: one, or one per prompt of a completions batch, whose prompt p's
    choice i is the answer's choice p * n + i (as vLLM numbers them). Started together, so the
    engine batches them; if one is refused, the others are aborted and the refusal raised."""

    def __init__(self, members: list[Generation], request_ids: list[str], n: int) -> None:
        self.members, self.request_ids, self.n = members, request_ids, n

    @classmethod
    async def start(
        cls,
        engine: AsyncLLM,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        policy: RequestPolicy,
    ) -> Generations:
        _check_prompt_logprobs(prompts, params, policy.max_prompt_logprobs)
        ids = (
            [request_id]
            if len(prompts) == 1
            else [f"{request_id}-{p}" for p in range(len(prompts))]
        )
        try:
            members = await _all_or_none(
                Generation.start(engine, prompt, params, rid, policy)
                for prompt, rid in zip(prompts, ids, strict=True)
            )
        except BaseException:
            for rid in ids:  # those already started (a cancelled start closes its own stream)
                await engine.abort(rid)
            raise
        return cls(members, ids, params.n)

    @property
    def lasts(self) -> list[RequestOutput]:
        """Each prompt's latest output."""
        return [g.last for g in self.members]

    async def finals(self) -> list[RequestOutput]:
        """Each member's final output; if one fails, the others are cancelled (which aborts
        their engine requests) before its error is raised."""
        return await _all_or_none(g.final() for g in self.members)

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Every member's deltas as they come, numbered across the batch."""
        if len(self.members) == 1:
            async for batch in self.members[0].deltas():
                yield batch
            return
        queue: asyncio.Queue[list[ChoiceDelta] | BaseException | None] = asyncio.Queue()

        async def pump(p: int, generation: Generation) -> None:
            try:
                async for batch in generation.deltas():
                    shift = p * self.n
                    await queue.put([dataclasses.replace(d, index=shift + d.index) for d in batch])
            except Exception as exc:
                await queue.put(exc)
            await queue.put(None)

        pumps = [asyncio.create_task(pump(p, g)) for p, g in enumerate(self.members)]
        try:
            running = len(pumps)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:  # cancelled pumps close their engine streams, which aborts what is left
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def usage(self) -> Usage:
        """Summed over the prompts, as OpenAI does for a batch."""
        usages = [g.usage() for g in self.members]
        cached = sum(
            u.prompt_tokens_details.cached_tokens for u in usages if u.prompt_tokens_details
        )
        return Usage(
            prompt_tokens=sum(u.prompt_tokens for u in usages),
            completion_tokens=sum(u.completion_tokens for u in usages),
            total_tokens=sum(u.total_tokens for u in usages),
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
