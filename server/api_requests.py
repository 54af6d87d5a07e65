"""Request bodies of the OpenAI API as pydantic models: types are strict (a string where a number
belongs is a 400, as on OpenAI) and every OpenAI feature we do not implement is refused by name.
Chat messages and the requests that carry them are in server/chat_requests.py."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from engine import GuidedDecoding, SamplingParams
from server.request_model import RequestModel

logger = logging.getLogger(__name__)
INT64 = 2**63
# Each stop string is searched for after every token of every choice, in the engine's loop, which
# all requests share: 95,000 of them (under 1 MiB) slowed everyone's tokens a hundredfold.
MAX_STOP_STRINGS = 64  # OpenAI takes 4


def refuse_if_set(value: Any, info: ValidationInfo) -> Any:
    """Used on fields we parse only to say no: ignoring them would return wrong answers quietly."""
    if value not in (None, False, "", [], {}):
        raise ValueError("not supported by this server")
    return value


def valid_unicode(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds text that is not valid Unicode (a lone surrogate)") from None
    return text


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # extension (vLLM): usage in every chunk


class JSONSchemaFormat(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {}: any JSON object
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(RequestModel):
    """OpenAI's structured outputs: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type 'json_schema', and only then")
        return self

    def guided(self) -> GuidedDecoding | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else {}
        return GuidedDecoding(json.dumps(schema) if schema else None)


class StructuredOutputs(RequestModel):
    """vLLM's `structured_outputs` extension: exactly one of a JSON schema, a regex, a choice
    among strings, an EBNF grammar, or any JSON object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object or None]
        if sum(g is not None for g in given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def guided(self) -> GuidedDecoding:
        schema = self.json_
        param = "structured_outputs"
        if isinstance(schema, dict):
            schema = json.dumps(schema)
        choice = None if self.choice is None else tuple(self.choice)
        return GuidedDecoding(schema, self.regex, choice, self.grammar, param=param)


class SamplingRequest(RequestModel):
    """The fields chat and completions share; each maps onto one SamplingParams field, whose own
    range checks (raising RequestError with the same field name) turn into 400s."""

    model: str | None = None  # OpenAI requires it; like vLLM we default to the served model
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    min_p: float | None = None  # extension (vLLM)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    include_stop_str_in_output: bool = False  # extension (vLLM)
    skip_special_tokens: bool = True  # extension (vLLM)
    min_tokens: int | None = None  # extension (vLLM)
    repetition_penalty: float | None = None  # extension (vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user tag for the caller's own bookkeeping; we only accept it
    logit_bias: dict[str, float] | None = None  # token id (as a string, as in OpenAI) -> bias
    response_format: ResponseFormat | None = None  # completions too, as in vLLM
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # extension (vLLM), whole answers only
    structured_outputs: StructuredOutputs | None = None  # extension (vLLM)

    @field_validator("structured_outputs")
    @classmethod
    def _one_structure(
        cls, value: StructuredOutputs | None, info: ValidationInfo
    ) -> StructuredOutputs | None:
        response_format = info.data.get("response_format")
        if value is not None and response_format is not None and response_format.type != "text":
            raise ValueError("give `response_format` or `structured_outputs`, not both")
        return value

    @property
    def structured(self) -> bool:
        """Whether the output must keep a structure (without building it, as guided() does)."""
        text = self.response_format is None or self.response_format.type == "text"
        return self.structured_outputs is not None or not text

    def guided(self) -> GuidedDecoding | None:
        """The structure the output must keep, from `response_format` or `structured_outputs`."""
        if self.structured_outputs is not None:
            return self.structured_outputs.guided()
        return None if self.response_format is None else self.response_format.guided()

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(key.isascii() and key.isdigit() and len(key) <= 18 for key in value):
            raise ValueError("keys must be token ids (non-negative integers as strings)")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if value is not None and not (
            isinstance(value, list) and all(isinstance(s, str) for s in value)
        ):
            raise ValueError("must be a string or a list of strings")
        if value is not None and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
        return value

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_whole(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("not available when `stream` is true (as in vLLM)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when `stream` is true")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's: only together with include_usage."""
        options = self.stream_options
        return self.include_usage and bool(options and options.continuous_usage_stats)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, score_prompt: bool | None = False
    ) -> SamplingParams:
        """Raises RequestError for out-of-range values (answered as 400 naming the field)."""
        return SamplingParams(
            n=1 if self.n is None else self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_tokens=self.min_tokens or 0,
            logprobs=logprobs,
            prompt_logprobs=max(
                (
                    k
                    for k in (self.prompt_logprobs, logprobs if score_prompt else None)
                    if k is not None
                ),
                default=None,
            ),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            guided=self.guided(),
        )


MAX_PROMPTS = 128  # a completions batch at most; each prompt is an engine request of its own


class CompletionRequest(SamplingRequest):
    # one prompt (text or token ids) or a batch of them; normalised to a batch
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions; null means up to the context
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    _unsupported_completion = field_validator("suffix")(refuse_if_set)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        """A string or token ids, or a list of up to MAX_PROMPTS strings or of token id lists:
        always a list of prompts once validated."""
        if isinstance(value, str) or (isinstance(value, list) and value and type(value[0]) is int):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValueError("must be a string, token ids, or a list of either")
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"got {len(value)} prompts; at most {MAX_PROMPTS} per request")
        texts = all(isinstance(p, str) for p in value)
        if not texts and not all(
            isinstance(p, list) and all(type(t) is int for t in p) for p in value
        ):
            raise ValueError(
                "must be a string, token ids, or a list of strings or of token id lists"
            )
        if not texts and not all(value):
            raise ValueError("a prompt is empty")
        return [valid_unicode(p) for p in value] if texts else value

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        assert isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)
        return self.prompt  # type: ignore[return-value]

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("not supported by this server (use `n`)")
        return value

    def to_sampling_params(self) -> SamplingParams:
        # An echoed prompt carries logprobs too.
        return self.sampling_params(self.max_tokens, self.logprobs, self.echo)


class DetokenizeRequest(RequestModel):
    """vLLM's /detokenize: token ids back to text."""

    model: str | None = None
    tokens: list[int]
