"""A tool call as parsed out of a model's text: what every `--tool-call-parser` format returns."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

ToolSchemas = Mapping[str, Mapping[str, Any]]  # a request's tools: name -> parameters' schema


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text
    id: str

    @classmethod
    def new(cls, name: str, arguments: Any, call_id: str | None = None) -> Call:
        """Arguments keep their characters, except that a lone surrogate (the model wrote
        "\\udc00") stays escaped: raw, it cannot be sent as UTF-8. ValueError for NaN or an
        infinity, which JSON cannot hold (Python's json reads and writes them)."""
        text = arguments
        if not isinstance(arguments, str):
            text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
            if not utf8(text):
                text = json.dumps(arguments, allow_nan=False)
        return cls(name, text, call_id or f"call_{uuid.uuid4().hex[:24]}")


def utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_call(value: Any, new_id: Callable[[], str | None]) -> Call | None:
    """A {"name": str, "arguments": object} call, or None if `value` is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if not utf8(value["name"]):
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    try:
        return Call.new(value["name"], arguments, new_id())
    except ValueError:  # NaN or an infinity among the arguments
        return None


def tagged_blocks(text: str, start: int, open_tag: str, close_tag: str) -> Iterator[str]:
    """The text inside each open_tag...close_tag from `start` on, up to the first block left
    open. Found with str.find, so thousands of unclosed tags (a model repeating itself) cost
    linear time, where a regex tried from each opener costs quadratic."""
    while (begin := text.find(open_tag, start)) >= 0:
        end = text.find(close_tag, begin + len(open_tag))
        if end < 0:
            return
        yield text[begin + len(open_tag) : end]
        start = end + len(close_tag)


def content_before(text: str, start: int) -> str | None:
    """The text before a format's first call, None when it is only whitespace."""
    return text[:start] if text[:start].strip() else None


def held_suffix(text: str, marker: str) -> int:
    """How many trailing characters of `text` may be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
