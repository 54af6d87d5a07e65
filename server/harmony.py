"""gpt-oss's harmony format, read from text that keeps its special tokens: reasoning split from
content (`--reasoning-parser openai_gptoss`) and tool calls (`--tool-call-parser openai`), as vLLM
returns them.

After the prompt's `<|start|>assistant` the model writes messages: a header, `<|message|>`, a body
and an end (`<|end|>`; `<|return|>` or `<|call|>`, EOS tokens, rarely in the text). Later messages
open with `<|start|>assistant`. The header names the channel (`<|channel|>analysis`) and, for a
tool call, the recipient (`to=functions.NAME`, before or after the channel), maybe with a content
type (`<|constrain|>json`, ` json`). Each message goes to:
- reasoning: `analysis`, and calls to built-in tools (`to=python`), joined by newlines;
- content: `final`, and `commentary` with no recipient (a preamble the user may see), joined by
  newlines, without any markup;
- content, markup and all (`<|start|>`, its header as written, `<|message|>`, its body, and
  `<|call|>` once it ended): a call to `functions.NAME`. The split cannot know whether the
  request's calls are parsed, so it hands calls on as other formats' calls reach their parsers:
  the `openai` tool parser takes them out; under tool_choice "none", or when one does not parse,
  they stay text, as other formats' calls do.
A text that does not open with a header (a model that writes no harmony) is all content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar

from server.tool_call_text import Call, content_before, held_suffix, parse_call

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
OPENERS = (CHANNEL, START, " to=")  # how a text that opens with a header opens
FUNCTIONS = "functions."
CHANNEL_NAME = re.compile(r"<\|channel\|>([^\s<]*)")
RECIPIENT = re.compile(r"\bto=([^\s<]+)")


@dataclass(frozen=True)
class Message:
    header: str  # from the role on: "assistant<|channel|>commentary to=functions.f json"
    body: str
    ended: bool  # its end marker was written

    @property
    def channel(self) -> str | None:
        found = CHANNEL_NAME.search(self.header)
        return None if found is None else found[1]

    @property
    def function(self) -> str | None:
        """The function this message calls, if it is a call."""
        found = RECIPIENT.search(self.header)
        if found is None or not found[1].startswith(FUNCTIONS):
            return None
        return found[1][len(FUNCTIONS) :]

    @property
    def is_reasoning(self) -> bool:
        return self.function is None and (
            self.channel == "analysis" or RECIPIENT.search(self.header) is not None
        )

    def as_written(self) -> str:
        """The call as the `openai` tool parser reads it, whichever message of the text it was."""
        return START + self.header + MESSAGE + self.body + ("<|call|>" if self.ended else "")


BOUNDARY = re.compile("|".join(re.escape(marker) for marker in (START, *ENDS)))


def _body_end(text: str, at: int, finished: bool) -> tuple[int, int] | None:
    """Where the body from `at` ends and where what follows it starts (the next `<|start|>`, or
    the text's end). A `<|start|>` ends a body; an end marker only when a new message, or the end
    of a finished text, follows it: one written as plain text inside an answer is the answer's.
    None: the body runs on (or, unfinished, whether it ended is not known yet). One scan, by one
    pattern: linear in the text."""
    pos = at
    while (marker := BOUNDARY.search(text, pos)) is not None:
        if marker[0] == START:
            return marker.start(), marker.start()
        after = marker.end()
        if text.startswith(START, after) or (finished and after == len(text)):
            return marker.start(), after
        pos = after
    return None


def read_messages(text: str, finished: bool, opened: bool = False) -> list[Message]:
    """The messages of a text written after `<|start|>assistant` whose header is complete.
    `opened`: the text starts inside an analysis message's body. Unfinished, the last body holds
    back a tail that may still become a marker, or that ends it."""
    messages: list[Message] = []
    at, role = 0, "assistant"  # the prompt wrote the first message's role
    if not opened and text.startswith(START):
        at, role = len(START), ""
    header = "assistant<|channel|>analysis" if opened else None
    while True:
        if header is None:
            header_end = text.find(MESSAGE, at)
            if header_end < 0:
                return messages
            header, at = role + text[at:header_end], header_end + len(MESSAGE)
        end = _body_end(text, at, finished)
        if end is None:
            body = text[at:]
            if not finished:  # a partial marker, then an end marker that may yet end it
                body = body[: len(body) - max(held_suffix(body, m) for m in (START, *ENDS))]
                body = next((body[: -len(e)] for e in ENDS if body.endswith(e)), body)
            return [*messages, Message(header, body, ended=False)]
        messages.append(Message(header, text[at : end[0]], ended=True))
        if end[1] == len(text):
            return messages
        at, header, role = end[1] + len(START), None, ""


@dataclass(frozen=True)
class HarmonyFormat:
    keep_special_tokens: ClassVar[bool] = True
    grammar_start: ClassVar[str] = CHANNEL + "final" + MESSAGE
    opener: ClassVar[str | None] = None

    def starts_open(self, prompt: str) -> bool:
        """Whether the rendered prompt leaves an analysis message open (a prefilled chain of
        thought). After `<|start|>assistant`, or inside a prefilled final answer, it is not."""
        begin = max(prompt.rfind(START), 0)
        header_end = prompt.find(MESSAGE, begin)
        if header_end < 0 or any(end in prompt[header_end:] for end in ENDS):
            return False
        return Message(prompt[begin:header_end], "", ended=False).channel == "analysis"

    def split(self, text: str, finished: bool, opened: bool) -> tuple[str, str | None]:
        """A choice's whole text so far -> (reasoning, content; None until a message for the user
        begins). Unfinished, a message counts from its complete header, and a tail that may still
        become a marker is held back, so each part only ever grows as the text does."""
        if not opened and not text.startswith(OPENERS):
            if not finished and any(o.startswith(text) for o in OPENERS):
                return "", None
            return "", text
        reasoning: list[str] = []
        content, after_text = None, False
        for message in read_messages(text, finished, opened):
            if message.function is not None:
                content, after_text = (content or "") + message.as_written(), False
            elif message.is_reasoning:
                reasoning.append(message.body)
            else:
                content = (content or "") + ("\n" if after_text else "") + message.body
                after_text = True
        return "\n".join(reasoning), content


def harmony_calls(text: str) -> tuple[str | None, list[Call]]:
    """(the content before the calls, or None if there is none; the calls) of a content that
    `HarmonyFormat.split` wrote. Arguments are a JSON object, whatever content type is named."""
    start = text.find(START)
    if start < 0:
        return text, []
    calls = []
    for message in read_messages(text[start:], finished=True):
        if not message.function:
            return text, []
        try:
            arguments = json.loads(message.body)
        except (ValueError, RecursionError):  # ValueError: bad JSON, or a 5000-digit number
            return text, []
        call = parse_call({"name": message.function, "arguments": arguments}, lambda: None)
        if call is None:
            return text, []
        calls.append(call)
    return (content_before(text, start), calls) if calls else (text, [])
