"""Tool calls written in a model's text (`tool_choice` "auto"), one format per `--tool-call-parser`.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen2.5/Qwen3 and many
  fine-tunes write them.
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, as Mixtral-8x22B-Instruct and
  Mistral's v3 tokenizers write them. `[TOOL_CALLS]` is a special token, so requests with tools
  keep special tokens in their text; Mistral's templates take 9-character call ids.
- `deepseek_v3`: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` then the
  arguments in a ```json block and `<｜tool▁call▁end｜>`, per call, as DeepSeek-V2.5/V3 write them
  (special tokens too).
- `deepseek_v31`: the same markers, `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>`
  per call with bare JSON arguments, as DeepSeek-V3.1 and later write them.
- `glm45`, `qwen3_coder` and `minimax_m2` write arguments in tags, typed by the request's tool
  schemas (server/tool_parsers_xml.py).
- `openai`: gpt-oss's harmony messages to `functions.NAME`, as `--reasoning-parser openai_gptoss`
  hands them on in the content (server/harmony.py).

A format that does not parse leaves the whole text as content, with no calls, as vLLM does.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from server.harmony import START, harmony_calls
from server.tool_call_text import (
    Call,
    ToolSchemas,
    content_before,
    held_suffix,
    parse_call,
    tagged_blocks,
)
from server.tool_parsers_xml import (
    MINIMAX_TOOL_CALL,
    TOOL_CALL,
    glm45_calls,
    minimax_m2_calls,
    qwen3_coder_calls,
)


def hermes_calls(text: str) -> tuple[str | None, list[Call]]:
    """(the text before the first call, or None if there is none; the calls)."""
    calls = []
    for block in tagged_blocks(text, 0, "<tool_call>", "</tool_call>"):
        try:
            call = parse_call(json.loads(block), lambda: None)
        except (ValueError, RecursionError):  # ValueError: bad JSON, or a 5000-digit number
            return text, []
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    return content_before(text, text.index("<tool_call>")), calls


def _mistral_id() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def mistral_calls(text: str) -> tuple[str | None, list[Call]]:
    """(the text before `[TOOL_CALLS]`, or None if there is none; the calls in the JSON after)."""
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return text, []
    try:  # the first JSON value; what follows (an EOS kept as text, say) is not a call
        values, _ = json.JSONDecoder().raw_decode(text[start + len("[TOOL_CALLS]") :].lstrip())
    except (ValueError, RecursionError):
        return text, []
    values = values if isinstance(values, list) else [values]
    calls = [parse_call(v, _mistral_id) for v in values]
    if not calls or None in calls:
        return text, []
    return content_before(text, start), [c for c in calls if c is not None]


DEEPSEEK_START = "<｜tool▁calls▁begin｜>"
DEEPSEEK_CALL = ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>")
# what one call block holds, per version
DEEPSEEK_V3_CALL = re.compile(
    r"function<｜tool▁sep｜>(?P<name>[^\n]*)\n```json\n(?P<arguments>.*)\n```", re.DOTALL
)
DEEPSEEK_V31_CALL = re.compile(r"(?P<name>[^<\n]*)<｜tool▁sep｜>(?P<arguments>.*)", re.DOTALL)


def deepseek_calls(
    text: str, pattern: re.Pattern[str] = DEEPSEEK_V3_CALL
) -> tuple[str | None, list[Call]]:
    """(the text before the calls, or None if there is none; each call's name and JSON object
    arguments, as `pattern` reads each call block)."""
    start = text.find(DEEPSEEK_START)
    if start < 0:
        return text, []
    calls = []
    for block in tagged_blocks(text, start, *DEEPSEEK_CALL):
        match = pattern.fullmatch(block)
        if match is None:
            return text, []
        try:
            arguments = json.loads(match["arguments"])
        except (ValueError, RecursionError):
            return text, []
        call = parse_call({"name": match["name"], "arguments": arguments}, lambda: None)
        if call is None:
            return text, []
        calls.append(call)
    return (content_before(text, start), calls) if calls else (text, [])


Parse = Callable[[str, ToolSchemas], tuple[str | None, list[Call]]]  # -> (content, calls)


def _untyped(parse: Callable[[str], tuple[str | None, list[Call]]]) -> Parse:
    """A format whose arguments are JSON, typed as written: the schemas are not needed."""
    return lambda text, _tools: parse(text)


@dataclass(frozen=True)
class ToolCallFormat:
    start: str  # what a call begins with in the text
    parse: Parse  # (text, the request's tools) -> (content, calls)
    keep_special_tokens: bool  # the start is a special token


TOOL_CALL_PARSERS = {
    "hermes": ToolCallFormat("<tool_call>", _untyped(hermes_calls), keep_special_tokens=False),
    "mistral": ToolCallFormat("[TOOL_CALLS]", _untyped(mistral_calls), keep_special_tokens=True),
    "deepseek_v3": ToolCallFormat(
        DEEPSEEK_START, _untyped(deepseek_calls), keep_special_tokens=True
    ),
    "deepseek_v31": ToolCallFormat(
        DEEPSEEK_START,
        _untyped(partial(deepseek_calls, pattern=DEEPSEEK_V31_CALL)),
        keep_special_tokens=True,
    ),
    "glm45": ToolCallFormat(TOOL_CALL, glm45_calls, keep_special_tokens=True),
    "qwen3_coder": ToolCallFormat(TOOL_CALL, qwen3_coder_calls, keep_special_tokens=False),
    "minimax_m2": ToolCallFormat(MINIMAX_TOOL_CALL[0], minimax_m2_calls, keep_special_tokens=False),
    "openai": ToolCallFormat(START, _untyped(harmony_calls), keep_special_tokens=True),
}


class ToolCallStream:
    """One streamed choice of a request with tools: which text may go out now. A forced call
    (`start` None) is held back whole; otherwise text streams until a call may be starting (a
    partial start marker is held until it is certain), and everything from the call on is held.
    Whitespace before any text is held too: before a call it is no content (`content_before`), as
    with the `</think>\n\n` that MiniMax-M2 writes before its calls."""

    def __init__(self, start: str | None) -> None:
        self.start, self.sent, self.in_call = start, 0, False

    def feed(self, text: str) -> str:
        """`text`: the choice's whole text so far -> the new part that may be streamed."""
        if self.start is None or self.in_call:
            return ""
        found = text.find(self.start, self.sent)
        self.in_call = found >= 0
        end = found if self.in_call else len(text) - held_suffix(text, self.start)
        if end <= self.sent or not text[:end].strip():
            return ""
        out, self.sent = text[self.sent : end], end
        return out
