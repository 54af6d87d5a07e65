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
- `kimi_k2`: `<|tool_calls_section_begin|>` (or `<|tool_call_section_begin|>`), then
  `<|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>ARGUMENTS<|tool_call_end|>`
  per call, as Kimi-K2 writes them (special tokens). `functions.NAME:INDEX` is also the call's id,
  as Kimi's templates render earlier calls and vLLM returns them.
- `glm45`, `qwen3_coder` and `minimax_m2` write arguments in tags, typed by the request's tool
  schemas (server/tool_parsers_xml.py).
- `openai`: gpt-oss's harmony messages to `functions.NAME`, as `--reasoning-parser openai_gptoss`
  hands them on in the content (server/harmony.py).
- `pythonic` and `llama4_pythonic`: the whole answer a Python list of calls, `[f(a=1), g()]`, as
  Llama 3.2 and Llama 4 write them (server/tool_parsers_pythonic.py).

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
from server.tool_parsers_pythonic import (
    PYTHON_START,
    PYTHONIC_START,
    llama4_pythonic_calls,
    pythonic_calls,
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
# the plural spelling is Kimi's token; vLLM also accepts the singular one
KIMI_K2_STARTS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")
KIMI_K2_CALL_TAGS = ("<|tool_call_begin|>", "<|tool_call_end|>")
# `functions.` once read is no name: "functions.:0" names nothing
KIMI_K2_CALL = re.compile(
    r"\s*(?P<id>(?:functions\.)?+(?P<name>[^\s<:]+):\d+)\s*<\|tool_call_argument_begin\|>"
    r"(?P<arguments>.*)",
    re.DOTALL,
)


def marked_calls(
    text: str, starts: tuple[str, ...], tags: tuple[str, str], pattern: re.Pattern[str]
) -> tuple[str | None, list[Call]]:
    """(the text before the first of `starts`, or None if there is none; the calls between
    `tags`, each read by `pattern` into its name, its JSON object arguments and, where the format
    writes one, its id)."""
    found = [i for s in starts if (i := text.find(s)) >= 0]
    if not found:
        return text, []
    start = min(found)
    calls = []
    for block in tagged_blocks(text, start, *tags):
        match = pattern.fullmatch(block)
        if match is None:
            return text, []
        try:
            arguments = json.loads(match["arguments"])
        except (ValueError, RecursionError):
            return text, []
        written = match.groupdict().get("id")
        if any(c.id == written for c in calls):  # a repeated index: ids must stay unique
            written = None
        call = parse_call({"name": match["name"], "arguments": arguments}, lambda: written)  # noqa: B023 (called now)
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
    other_starts: tuple[str, ...] = ()  # other spellings of the start that models write
    # the calls are the whole answer: a start counts only at its beginning (after whitespace)
    leading: bool = False

    @property
    def starts(self) -> tuple[str, ...]:
        return (self.start, *self.other_starts)


def _marked_format(
    starts: tuple[str, ...], tags: tuple[str, str], pattern: re.Pattern[str]
) -> ToolCallFormat:
    """A format of special-token markers, with JSON arguments."""
    parse = partial(marked_calls, starts=starts, tags=tags, pattern=pattern)
    return ToolCallFormat(
        starts[0], _untyped(parse), keep_special_tokens=True, other_starts=starts[1:]
    )


TOOL_CALL_PARSERS = {
    "hermes": ToolCallFormat("<tool_call>", _untyped(hermes_calls), keep_special_tokens=False),
    "mistral": ToolCallFormat("[TOOL_CALLS]", _untyped(mistral_calls), keep_special_tokens=True),
    "deepseek_v3": _marked_format((DEEPSEEK_START,), DEEPSEEK_CALL, DEEPSEEK_V3_CALL),
    "deepseek_v31": _marked_format((DEEPSEEK_START,), DEEPSEEK_CALL, DEEPSEEK_V31_CALL),
    "kimi_k2": _marked_format(KIMI_K2_STARTS, KIMI_K2_CALL_TAGS, KIMI_K2_CALL),
    "glm45": ToolCallFormat(TOOL_CALL, glm45_calls, keep_special_tokens=True),
    "qwen3_coder": ToolCallFormat(TOOL_CALL, qwen3_coder_calls, keep_special_tokens=False),
    "minimax_m2": ToolCallFormat(MINIMAX_TOOL_CALL[0], minimax_m2_calls, keep_special_tokens=False),
    "openai": ToolCallFormat(START, _untyped(harmony_calls), keep_special_tokens=True),
    "pythonic": ToolCallFormat(
        PYTHONIC_START, _untyped(pythonic_calls), keep_special_tokens=False, leading=True
    ),
    # Llama 4's python tags are special tokens, skipped from the text by default (vLLM keeps
    # that default too), so the bare list is what gets parsed. A request that keeps special
    # tokens sees them, and the parser reads past them as vLLM's does; keeping them for every
    # request would only bring Llama's other special tokens into the content.
    "llama4_pythonic": ToolCallFormat(
        PYTHONIC_START,
        _untyped(llama4_pythonic_calls),
        keep_special_tokens=False,
        other_starts=(PYTHON_START,),
        leading=True,
    ),
}


class ToolCallStream:
    """One streamed choice of a request with tools: which text may go out now. A forced call
    (`starts` None) is held back whole; otherwise text streams until a call may be starting (a
    partial start marker is held until it is certain), and everything from the call on is held.
    Whitespace before any text is held too: before a call it is no content (`content_before`), as
    with the `</think>\n\n` that MiniMax-M2 writes before its calls. With `leading` (a format
    whose calls are the whole answer) a call can only open the text: once its first other text is
    no start, all of it streams."""

    def __init__(self, starts: tuple[str, ...] | None, leading: bool = False) -> None:
        self.starts, self.sent, self.in_call = starts, 0, False
        self.leading = leading

    def feed(self, text: str) -> str:
        """`text`: the choice's whole text so far -> the new part that may be streamed."""
        if self.starts is None or self.in_call:
            return ""
        if self.leading:
            return self._feed_leading(self.starts, text)
        found = [i for s in self.starts if (i := text.find(s, self.sent)) >= 0]
        self.in_call = bool(found)
        end = min(found) if found else len(text) - max(held_suffix(text, s) for s in self.starts)
        if end <= self.sent or not text[:end].strip():
            return ""
        out, self.sent = text[self.sent : end], end
        return out

    def _feed_leading(self, starts: tuple[str, ...], text: str) -> str:
        if self.sent == 0:  # nothing out yet: the first text after whitespace decides
            head = text.lstrip()
            self.in_call = any(head.startswith(s) for s in starts)
            if self.in_call or any(s.startswith(head) for s in starts):  # "" starts them all
                return ""
        out, self.sent = text[self.sent :], len(text)
        return out
