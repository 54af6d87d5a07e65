"""The engine's per-token logprobs in OpenAI's two shapes: chat's list of token objects and the
legacy completions' parallel lists."""

from __future__ import annotations

from engine.outputs import TokenLogprob
from server.api_responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=_utf8(e.token),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=_utf8(t)) for _, t, lp in e.top
                ],
            )
            for e in entries
        ]
    )


def completion_logprobs(
    entries: list[TokenLogprob], start_offset: int
) -> tuple[CompletionLogprobs, int]:
    """`start_offset` is where these tokens' text begins in the choice's text (nonzero for later
    stream chunks); returns the logprobs and the offset just past them."""
    offsets, top = [], []
    offset = start_offset
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
        alternatives = {t: lp for _, t, lp in e.top}
        alternatives.setdefault(e.token, e.logprob)  # OpenAI lists the sampled token too
        top.append(alternatives)
    logprobs = CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=top,
        text_offset=offsets,
    )
    return logprobs, offset
