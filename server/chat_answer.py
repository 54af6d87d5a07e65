"""A chat choice's text -> what the API returns: reasoning (with `--reasoning-parser`), content and
tool calls; for a finished choice (`answer`) and, piece by piece, for a stream (`ChoiceStream`).

Reasoning comes first in the text and tool calls are parsed out of the content after it. Output
bound by a grammar (`response_format`, a forced tool call) follows it from the end of the
reasoning on (`</think>`; gpt-oss's final message) when the prompt opened it, or when the model
opens a think block with its first token where the prompt leaves that to it (Qwen3, GLM-4.5);
otherwise from its first token, and is all content.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine import SamplingParams
from server.api_responses import ChatChunkChoice, Delta, FunctionCall, ToolCall, ToolCallDelta
from server.chat_requests import ChatCompletionRequest
from server.generations import ChoiceDelta
from server.logprobs import chat_logprobs
from server.reasoning import ReasoningFormat
from server.tool_calls import NamedToolChoice, forced_calls
from server.tool_parsers import ToolCallFormat, ToolCallStream


@dataclass(frozen=True)
class ChatFormats:
    """How the served model writes tool calls and reasoning (None: it does not, or we do not parse)."""

    tools: ToolCallFormat | None = None
    reasoning: ReasoningFormat | None = None


@dataclass(frozen=True)
class Answer:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] | None
    finish_reason: str | None


def split_reasoning(
    request: ChatCompletionRequest, formats: ChatFormats, text: str, finished: bool
) -> tuple[str, str | None]:
    """(reasoning, content; None while still reasoning) of a choice's text so far. Output under
    a grammar is all content unless it may think first (`grammar_after_reasoning`)."""
    bound = request.structured or request.forces_tool_call
    if formats.reasoning is None or (bound and request.reasoning_open is False):
        return "", text
    return formats.reasoning.split(text, finished, bool(request.reasoning_open))


def grammar_after_reasoning(
    params: SamplingParams, request: ChatCompletionRequest, reasoning: ReasoningFormat
) -> SamplingParams:
    """A grammar-bound answer that starts inside its reasoning (the prompt opened it) thinks
    freely and follows its grammar from the reasoning's end on (`</think>`; gpt-oss's
    `<|channel|>final<|message|>`), as vLLM does. Where
    the model decides, it may open a think block with its first token (`GuidedDecoding.opener`),
    else the grammar holds from there: vLLM would leave such an answer free until a `</think>`
    that may never come."""
    if params.guided is None or request.reasoning_open is False:
        return params
    opener = reasoning.opener if request.reasoning_open is None else None
    guided = dataclasses.replace(params.guided, start_after=reasoning.grammar_start, opener=opener)
    return dataclasses.replace(params, guided=guided)


def answer(
    request: ChatCompletionRequest, formats: ChatFormats, text: str, finish_reason: str | None
) -> Answer:
    """A finished choice. Calls end it with "tool_calls", except a named forced call, which ends
    as generated ("stop"), as on OpenAI, and an answer cut short by max_tokens, which ends with
    "length" so the client knows a call after the parsed ones may be missing. Reasoning is
    dropped when the request says `include_reasoning: false`."""
    reasoning, content = split_reasoning(request, formats, text, finished=True)
    shown = (reasoning or None) if request.include_reasoning else None
    choice = request.effective_tool_choice
    if content is None or choice == "none":
        return Answer(shown, content, None, finish_reason)
    if request.forces_tool_call:
        calls = forced_calls(content, choice)
        if calls is None:  # cut short (max_tokens): what there is stays text
            return Answer(shown, content, None, finish_reason)
        content = None
    else:
        assert formats.tools is not None  # "auto" is refused without a parser
        content, calls = formats.tools.parse(content, request.tool_schemas)
        if not calls:
            return Answer(shown, content, None, finish_reason)
        if request.parallel_tool_calls is False:
            calls = calls[:1]
    tool_calls = [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ]
    kept = isinstance(choice, NamedToolChoice) or finish_reason == "length"
    return Answer(shown, content, tool_calls, finish_reason if kept else "tool_calls")


class ChoiceStream:
    """One streamed choice: what each engine delta adds to its reasoning and content. Content that
    may start a tool call is held back (`ToolCallStream`); the calls go out whole, with the
    choice's last chunk."""

    def __init__(self, request: ChatCompletionRequest, formats: ChatFormats) -> None:
        self.request, self.formats = request, formats
        self.text, self.reasoning_sent, self.content_sent = "", 0, 0
        self.with_tools = request.effective_tool_choice != "none"
        tools = None if request.forces_tool_call else formats.tools
        starts = None if tools is None else tools.starts
        self.calls = ToolCallStream(starts, leading=tools is not None and tools.leading)

    def advance(self, d: ChoiceDelta) -> ChatChunkChoice | None:
        """The chunk for this delta, or None when all of it is held back."""
        self.text += d.text
        finish_reason = d.finish_reason
        reasoning, content = split_reasoning(
            self.request, self.formats, self.text, bool(finish_reason)
        )
        new_reasoning = reasoning[self.reasoning_sent :] if self.request.include_reasoning else ""
        self.reasoning_sent = len(reasoning)
        text, calls = "", None
        if content is not None and not self.with_tools:
            text, self.content_sent = content[self.content_sent :], len(content)
        elif content is not None:
            text = self.calls.feed(content)
            if finish_reason is not None:
                whole = answer(self.request, self.formats, self.text, finish_reason)
                finish_reason = whole.finish_reason
                if whole.tool_calls:
                    calls = [
                        ToolCallDelta(index=i, **c.model_dump())
                        for i, c in enumerate(whole.tool_calls)
                    ]
                else:
                    text += content[self.calls.sent :]  # what was held back is text after all
        if not (new_reasoning or text or calls or d.logprobs or finish_reason):
            return None
        return ChatChunkChoice(
            index=d.index,
            delta=Delta(reasoning=new_reasoning or None, content=text or None, tool_calls=calls),
            logprobs=None if d.logprobs is None else chat_logprobs(d.logprobs),
            finish_reason=finish_reason,
        )
