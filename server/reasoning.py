"""A thinking model's reasoning, split out of its text (`--reasoning-parser`) and returned as
`reasoning` beside `content`, as vLLM does.

Whether the text starts inside a think block is read from the rendered prompt: its last marker
decides (`<think>` opened by the template or a prefilled answer; `</think>` closing it, as Qwen3
with `enable_thinking` off and DeepSeek-V3.1 in non-thinking mode write). With no marker in the
prompt, the parser's default holds:
- `deepseek_r1`: open. R1 may think without writing `<think>` first.
- `minimax_m2`: open, as MiniMax-M2 always thinks first; its template ends the prompt with
  `<think>\n`, so the prompt decides anyway.
- `qwen3`, `glm45`: the model decides, by opening `<think>...</think>` itself or not (GLM-4.5's
  template closes an empty block, `<think></think>`, when thinking is off).

An open block runs to `</think>`; a choice cut short inside it is all reasoning. Text after
`</think>` is content as written, whitespace included; whitespace before a `<think>` the model
opens itself is dropped.

`openai_gptoss` reads gpt-oss's harmony messages instead (server/harmony.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from server.harmony import HarmonyFormat
from server.tool_call_text import held_suffix

THINK, END_THINK = "<think>", "</think>"


class ReasoningFormat(Protocol):
    """How a `--reasoning-parser` reads a choice's text."""

    @property
    def keep_special_tokens(self) -> bool: ...  # its markers are special tokens

    @property
    def grammar_start(self) -> str: ...  # where a grammar applies from, after free reasoning

    @property
    def opener(self) -> str | None: ...  # what opens reasoning where the model decides to think

    def starts_open(self, prompt: str) -> bool | None: ...

    def split(self, text: str, finished: bool, opened: bool) -> tuple[str, str | None]: ...


@dataclass(frozen=True)
class ThinkFormat:
    open_by_default: bool  # when the prompt has no marker, the text starts inside a think block
    keep_special_tokens: ClassVar[bool] = False
    grammar_start: ClassVar[str] = END_THINK
    opener: ClassVar[str | None] = THINK

    def starts_open(self, prompt: str) -> bool | None:
        """Whether a choice's text starts inside a think block, after this rendered prompt; None
        when the model decides, by writing `<think>` first or not."""
        start, end = prompt.rfind(THINK), prompt.rfind(END_THINK)
        if start == end == -1:
            return True if self.open_by_default else None
        return start > end

    def split(self, text: str, finished: bool, opened: bool) -> tuple[str, str | None]:
        """A choice's whole text so far -> (reasoning, content; None while still reasoning).
        `opened`: the text starts inside a think block. Unfinished, a tail that may still become
        a marker is held back from both, so each part only ever grows as the text does."""
        lead = text.lstrip()  # GLM-4.5 writes "\n<think>" after its "<|assistant|>"
        if lead.startswith(THINK):
            text, opened = lead[len(THINK) :], True
        elif not finished and THINK.startswith(lead):  # may still become "<think>"
            return "", None
        if not opened:
            return "", text
        end = text.find(END_THINK)
        if end >= 0:
            return text[:end], text[end + len(END_THINK) :]
        if finished:
            return text, None
        return text[: len(text) - held_suffix(text, END_THINK)], None


REASONING_PARSERS: dict[str, ReasoningFormat] = {
    "deepseek_r1": ThinkFormat(open_by_default=True),
    "qwen3": ThinkFormat(open_by_default=False),
    "glm45": ThinkFormat(open_by_default=False),
    "minimax_m2": ThinkFormat(open_by_default=True),
    "openai_gptoss": HarmonyFormat(),
}
