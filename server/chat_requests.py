"""Request bodies that carry chat messages: /v1/chat/completions and /tokenize. Messages, tools and
vLLM's chat template options are checked here; the sampling fields they share with completions
are in server/api_requests.py."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from engine import GuidedDecoding, SamplingParams
from engine.sampling import MAX_LOGPROBS
from server.api_requests import SamplingRequest, refuse_if_set, valid_unicode
from server.chat_template import TemplateOptions
from server.request_model import RequestModel
from server.tool_calls import (
    MAX_TOOLS,
    NamedToolChoice,
    Tool,
    ToolCallIn,
    ToolChoice,
    forced_schema,
    tool_choice_shape,
)


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # only an assistant message with tool calls may omit it
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # the assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers
    reasoning: str | None = None  # an assistant's earlier reasoning, as vLLM returns it
    reasoning_content: str | None = None  # the same, by its older (DeepSeek) name

    @field_validator("role", mode="before")
    @classmethod
    def _no_function_role(cls, value: Any) -> Any:
        if value == "function":
            raise ValueError("'function' messages are deprecated by OpenAI: use 'tool' messages")
        return value

    @model_validator(mode="after")
    def _tool_fields_in_place(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        if (self.reasoning or self.reasoning_content) and self.role != "assistant":
            raise ValueError("only assistant messages carry reasoning")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("`tool_call_id` is required on tool messages, and only there")
        if self.content is None and not self.tool_calls:
            raise ValueError("`content` is required (unless an assistant message has tool_calls)")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        """Content given as parts is accepted when every part is text (joined by newlines, as vLLM)."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {kind or part!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    def template_dict(self) -> dict[str, Any]:
        """`developer` is OpenAI's new name for `system`; chat templates know only the old one."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content or "",
        }
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.template_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        reasoning = self.reasoning or self.reasoning_content
        if reasoning is not None:  # the names templates that show it read: Qwen3's, gpt-oss's
            message["reasoning_content"] = reasoning
            # gpt-oss's template refuses an assistant call with both `thinking` and content (a
            # preamble): such a turn goes without `thinking`
            if not (self.tool_calls and self.content):
                message["thinking"] = reasoning
        return message


class ChatTemplateFields(RequestModel):
    """vLLM's chat template extensions, on chat completions and /tokenize."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_way_to_end(self) -> ChatTemplateFields:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError(
                "`continue_final_message` needs `add_generation_prompt` set to false: the prompt "
                "either opens a new assistant message or continues the last one"
            )
        return self

    def template_options(self) -> TemplateOptions:
        return TemplateOptions(
            self.add_generation_prompt,
            self.continue_final_message,
            dict(self.chat_template_kwargs or {}),
        )


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of the next one
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: bool | None = None  # false: at most one call per choice
    include_reasoning: bool = True  # extension (vLLM): false drops the parsed reasoning
    reasoning_effort: Literal["low", "medium", "high"] | None = None  # for the chat template
    # Set from the rendered prompt (server/reasoning.py): the answer starts inside its reasoning
    # (a think block; gpt-oss's analysis message); None: the model decides, by writing "<think>"
    # first or not.
    _reasoning_open: bool | None = PrivateAttr(default=False)

    @property
    def reasoning_open(self) -> bool | None:
        return self._reasoning_open

    @reasoning_open.setter
    def reasoning_open(self, value: bool | None) -> None:
        self._reasoning_open = value

    functions: list[Any] | None = None  # deprecated by OpenAI in favour of tools
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    _unsupported_chat = field_validator("functions", "function_call", "audio", "prediction")(
        refuse_if_set
    )

    @field_validator("web_search_options")
    @classmethod
    def _refuse_web_search(cls, value: Any) -> Any:
        """Even `{}`: that is how OpenAI's API asks for a web search with its defaults."""
        if value is not None:
            raise ValueError("not supported by this server")
        return value

    _tool_choice_shape = field_validator("tool_choice", mode="before")(tool_choice_shape)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_fits_tools(
        cls, choice: ToolChoice | None, info: ValidationInfo
    ) -> ToolChoice | None:
        names = {t.function.name for t in info.data.get("tools") or ()}
        if choice not in (None, "none") and not names:
            raise ValueError("other than 'none', it needs `tools`")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names {choice.function.name!r}, which is not one of `tools`")
        structured = info.data.get("response_format") or info.data.get("structured_outputs")
        if choice not in (None, "none", "auto") and structured:
            raise ValueError(
                "a forced tool call cannot also follow `response_format` or `structured_outputs`"
            )
        return choice

    def template_options(self) -> TemplateOptions:
        """`reasoning_effort` reaches the template as a variable of that name (gpt-oss's reads
        it, as in vLLM), unless `chat_template_kwargs` sets one."""
        options = super().template_options()
        if self.reasoning_effort is None:
            return options
        kwargs = {"reasoning_effort": self.reasoning_effort, **options.kwargs}
        return dataclasses.replace(options, kwargs=kwargs)

    @property
    def effective_tool_choice(self) -> ToolChoice:
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def tool_schemas(self) -> dict[str, dict[str, Any]]:
        """Each tool's parameters' JSON schema, by name: how parsers that write arguments
        untyped (`glm45`) read them."""
        return {t.function.name: t.function.parameters or {} for t in self.tools or ()}

    @property
    def forces_tool_call(self) -> bool:
        return self.effective_tool_choice not in ("none", "auto")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when `logprobs` is true")
        return value

    def to_sampling_params(self) -> SamplingParams:
        """No max_tokens means up to the context length, as on OpenAI's chat endpoint. A forced
        tool call is generated under its JSON schema."""
        max_tokens = self.max_completion_tokens or self.max_tokens
        params = self.sampling_params(
            max_tokens, (self.top_logprobs or 0) if self.logprobs else None
        )
        parallel = self.parallel_tool_calls is not False  # OpenAI's default: allowed
        schema = forced_schema(self.tools or [], self.effective_tool_choice, parallel)
        if schema is None:
            return params
        guided = GuidedDecoding(schema, param="tools")
        return dataclasses.replace(params, guided=guided)  # checks it again


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template, to token ids."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)  # rendered with the messages
    add_special_tokens: bool = True  # for a prompt; the chat template places its own

    _prompt_is_text = field_validator("prompt")(lambda text: text and valid_unicode(text))

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` or `messages`")
        if self.tools is not None and self.messages is None:
            raise ValueError("`tools` are rendered with `messages` only")
        return self
