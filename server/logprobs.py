"""The engine's per-token logprobs in OpenAI's two shapes: chat's list of token objects and the
legacy completions' parallel lists."""

from __future__ import annotations

from collections.abc import Sequence

from engine.outputs import TokenLogprob
from server.api_responses import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=e.token_bytes,
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=b)
                    for (_, t, lp), b in zip(e.top, e.top_bytes, strict=True)
                ],
            )
            for e in entries
        ]
    )


def completion_logprobs(
    entries: Sequence[TokenLogprob | str], start_offset: int
) -> tuple[CompletionLogprobs, int]:
    """`start_offset` is where these tokens' text begins in the choice's text (nonzero for later
    stream chunks); returns the logprobs and the offset just past them. A bare string is a token
    without a logprob (an echoed prompt's first): null in both logprob lists, as on OpenAI."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = start_offset
    for e in entries:
        token = e if isinstance(e, str) else e.token
        logprobs.tokens.append(token)
        logprobs.text_offset.append(offset)
        offset += len(token)
        if isinstance(e, str):
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        alternatives = {t: lp for _, t, lp in e.top}
        alternatives.setdefault(e.token, e.logprob)  # OpenAI lists the sampled token too
        logprobs.token_logprobs.append(e.logprob)
        logprobs.top_logprobs.append(alternatives)
    return logprobs, offset


def prompt_logprobs(entries: Sequence[TokenLogprob | None], k: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: each prompt token's entry keyed by token id, the token first,
    then the best k (their ranks 1..k); null for the first token, which nothing predicts."""
    result: PromptLogprobs = []
    for e in entries:
        if e is None:
            result.append(None)
            continue
        scores = {
            str(e.token_id): PromptLogprob(logprob=e.logprob, rank=e.rank, decoded_token=e.token)
        }
        for rank, (token_id, text, lp) in enumerate(e.top[:k], start=1):
            scores.setdefault(
                str(token_id), PromptLogprob(logprob=lp, rank=rank, decoded_token=text)
            )
        result.append(scores)
    return result
