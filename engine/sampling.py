"""Per-request sampling parameters, validated the way the OpenAI API documents their ranges."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20


GREEDY_BELOW = 1e-5  # a temperature this low samples as temperature 0


class RequestError(ValueError):
    """A request the engine refuses; `param` names the field, as in OpenAI error bodies."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class GuidedDecoding:
    """Structured output (engine/guided.py), one of: `json_schema` (a schema as JSON text, or a
    dict, kept as its JSON text, as vLLM takes either), `regex`, `choice` (exactly one of these
    strings), `grammar` (EBNF, as xgrammar reads it); with none of them, any JSON object (OpenAI's
    json_object mode)."""

    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    param: str = "response_format"  # the request field that asked for it, for errors
    # The grammar applies from the first time this text appears in the output (a thinking model's
    # "</think>", as vLLM does); before it the text is free. None: from the first token.
    start_after: str | None = None
    # With `start_after`: the output may open with this marker (one token: a model that writes
    # "<think>" itself when it thinks); only then is the text free up to `start_after`. Otherwise
    # the grammar applies from the first token.
    opener: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        kinds = (self.json_schema, self.regex, self.choice, self.grammar)
        if sum(kind is not None for kind in kinds) > 1:
            raise RequestError(
                "give one of a JSON schema, a regex, a choice or a grammar", param=self.param
            )
        if self.choice is not None and not self.choice:
            raise RequestError("the choice needs at least one string", param=self.param)

    @property
    def schema(self) -> str:
        return self.json_schema or '{"type": "object"}'


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # vLLM: drop tokens less likely than min_p times the likeliest
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM, transformers: divides a seen token's positive logit
    min_tokens: int = 0  # vLLM: no EOS, stop token or stop string before this many tokens
    logprobs: int | None = None  # None: off; k: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob plus the top k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # False: special tokens are part of the text (tool markers)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    guided: GuidedDecoding | None = None  # None: free text

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("n", 1 <= self.n <= 128, "must be between 1 and 128"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be between 0 and 2"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be between 0 and 1"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be between -2 and 2"),
            (
                "frequency_penalty",
                -2.0 <= self.frequency_penalty <= 2.0,
                "must be between -2 and 2",
            ),
            (
                "repetition_penalty",
                0.0 < self.repetition_penalty < math.inf,
                "must be above 0 and finite",
            ),
            (
                "min_tokens",
                0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
                "must be between 0 and max_tokens",
            ),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"must be between 0 and {MAX_LOGPROBS}",
            ),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"must be between 0 and {MAX_LOGPROBS}",
            ),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be token ids"),
            (
                "logit_bias",
                all(
                    type(t) is int and t >= 0 and -100.0 <= b <= 100.0
                    for t, b in self.logit_bias.items()
                ),
                "must map token ids (>= 0) to biases between -100 and 100",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise RequestError(f"{name} {why}, got {getattr(self, name)!r}", param=name)
        if self.min_tokens and self.guided is not None:  # a complete grammar allows only a stop
            raise RequestError(
                "min_tokens cannot be combined with a structured output", param="min_tokens"
            )

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy, as in vLLM: dividing by a far smaller one
        overflows the logits to infinity."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def checked_max_tokens(
    prompt_token_ids: list[int],
    params: SamplingParams,
    vocab: int,
    max_model_len: int,
    fit_to_context: bool = False,
) -> int:
    """The completion's length limit, once the prompt and token ids are known to be valid for a
    model of `vocab` tokens and `max_model_len` context (OpenAI's errors otherwise).
    `fit_to_context` (offline, as vLLM's LLM): a completion longer than the context has room for
    is cut to it (finish reason "length"), not refused."""
    if not prompt_token_ids:
        raise RequestError("the prompt is empty", param="prompt")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
        raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
    for name, ids in (
        ("logit_bias", params.logit_bias),
        ("stop_token_ids", params.stop_token_ids),
    ):
        if ids and max(ids) >= vocab:
            raise RequestError(f"{name} token ids must be in [0, {vocab})", param=name)
    num_prompt = len(prompt_token_ids)
    max_tokens = params.max_tokens or max_model_len - num_prompt
    if fit_to_context and num_prompt < max_model_len:
        max_tokens = min(max_tokens, max_model_len - num_prompt)
    if num_prompt + max_tokens > max_model_len or max_tokens < 1:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt + max(max_tokens, 1)} tokens ({num_prompt} in the prompt, "
            f"{max(max_tokens, 1)} in the completion). Please reduce the length of the prompt or "
            "completion.",
            param="max_tokens" if params.max_tokens else "prompt",
            code="context_length_exceeded",
        )
    return max_tokens
