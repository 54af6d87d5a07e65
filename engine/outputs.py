"""What the engine hands back per request: cumulative text, tokens, logprobs and timings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token decoded on its own
    logprob: float
    top: list[tuple[int, str, float]] = field(
        default_factory=list
    )  # (id, text, logprob), best first
    rank: int = 0  # of the token in the vocabulary, 1 = the likeliest (0: not computed)
    token_bytes: list[int] = field(default_factory=list)  # its own bytes (OpenAI's `bytes`)
    top_bytes: list[list[int]] = field(default_factory=list)  # each of `top`'s


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative; while running, held back so it never ends in a partial stop string
    token_ids: list[int]  # cumulative
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None  # cumulative, one per token id


@dataclass
class RequestTiming:
    """Monotonic timestamps (time.monotonic) stamped by the engine; the frontend derives TTFT/TPOT."""

    arrival_s: float
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    timing: RequestTiming
    # One per prompt token when asked for (SamplingParams.prompt_logprobs); the first is None,
    # nothing precedes it. Filled as the prompt's prefill chunks run.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # Set when the engine ended the request for the request's own fault (its structured output
    # allows no token): the server answers 400 with it.
    error: str | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
