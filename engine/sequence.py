"""A request and its n sequences: token ids, progress, and the text shown so far."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from engine.guided import Guide
from engine.outputs import CompletionOutput, RequestOutput, RequestTiming, TokenLogprob
from engine.sampling import SamplingParams

_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generated choice. `token_ids` holds prompt + output; KV is valid for the first
    `num_computed_tokens` of them (reset to 0 on preemption, then recomputed)."""

    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    generator: torch.Generator | None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    text: str = ""  # full detokenized output (stop string already cut)
    visible_text: str = ""  # what may be streamed now: no partial stop string, no partial character
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    decode_stream: DecodeStream | None = None  # the detokenizer's incremental state
    guide: Guide | None = None  # its place in the grammar, for structured outputs
    stop_token_ids: frozenset[int] = frozenset()  # EOS (unless ignored), the request's stop ids
    # (token ids [n], biases [n]) of the request's logit_bias, made on its first draw: a bias may
    # name most of the vocabulary, too much to rebuild every step
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None
    num_cached_tokens: int | None = (
        None  # prompt tokens found in the prefix cache when first admitted
    )
    prompt_sibling: Sequence | None = None  # the request's first choice, for later ones

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefix_cacheable(self) -> bool:
        """Prompt logprobs need every prompt position computed, so the choice that scores the
        prompt (the first) starts from zero."""
        return self.params.prompt_logprobs is None or self.index != 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text,
            token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    timing: RequestTiming
    prompt_logprobs: list[TokenLogprob | None] | None = None  # see RequestOutput

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.to_output() for s in self.seqs],
            finished=self.finished,
            timing=self.timing,
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            num_cached_tokens=self.seqs[0].num_cached_tokens or 0,
        )
