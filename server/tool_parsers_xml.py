"""Tool-call formats that write each argument in tags, untyped, so the request's tool schemas type
them: a value is its text where the parameter's schema admits a string, else the JSON (or Python
literal) it spells, else its text, as these models' chat templates render earlier calls.

- `glm45`: `<tool_call>NAME` then `<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>` per
  argument and `</tool_call>`, as GLM-4.5/4.6 write them.
- `qwen3_coder`: `<tool_call><function=NAME>` then `<parameter=KEY>\\nVALUE\\n</parameter>` per
  argument and `</function></tool_call>`, as Qwen3-Coder writes them (one newline each side of a
  value is the template's, not the value's).
- `minimax_m2`: `<minimax:tool_call>` then, per call, `<invoke name="NAME">` with
  `<parameter name="KEY">VALUE</parameter>` per argument and `</invoke>`, then
  `</minimax:tool_call>`, as MiniMax-M2 writes them: one block may hold several calls, names may be
  quoted with " or ', and a value's edge whitespace is dropped, as MiniMax's and vLLM's parsers
  drop it.

No part crosses its closing tag, so a call that does not parse is rejected in linear time (a
backtracking pattern took seconds at 16 arguments).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from server.tool_call_text import Call, ToolSchemas, content_before, parse_call, tagged_blocks

TOOL_CALL = "<tool_call>"
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names


def _until(tag: str) -> str:
    """A pattern group for any text up to (not into) `tag`."""
    return f"((?:(?!{re.escape(tag)}).)*)"


TOOL_CALL_END = "</tool_call>"
GLM45_ARGUMENT = (
    "<arg_key>" + _until("</arg_key>") + r"</arg_key>\s*<arg_value>" + _until("</arg_value>")
) + "</arg_value>"
GLM45_ARGUMENTS = re.compile(r"(?:\s*" + GLM45_ARGUMENT + r")*\s*", re.DOTALL)
QWEN3_CODER_CALL = re.compile(r"\s*<function=([^>\n]*)>(.*)</function>\s*", re.DOTALL)
QWEN3_CODER_ARGUMENT = r"<parameter=([^>\n]*)>" + _until("</parameter>") + "</parameter>"
QWEN3_CODER_ARGUMENTS = re.compile(r"(?:\s*" + QWEN3_CODER_ARGUMENT + r")*\s*", re.DOTALL)
MINIMAX_TOOL_CALL = ("<minimax:tool_call>", "</minimax:tool_call>")
MINIMAX_INVOKE = r"<invoke name=([^>\n]*)>" + _until("</invoke>") + "</invoke>"
MINIMAX_INVOKES = re.compile(r"(?:\s*" + MINIMAX_INVOKE + r")*\s*", re.DOTALL)
MINIMAX_ARGUMENT = r"<parameter name=([^>\n]*)>" + _until("</parameter>") + "</parameter>"
MINIMAX_ARGUMENTS = re.compile(r"(?:\s*" + MINIMAX_ARGUMENT + r")*\s*", re.DOTALL)


def _admits(schema: Any, kind: str) -> bool:
    """Whether a parameter's schema admits values of a JSON type (`string`, `null`, ...): its
    type (or one of its types) is it, an anyOf/oneOf branch admits it, or, for strings and
    null, it enumerates one."""
    if not isinstance(schema, Mapping):
        return False
    kinds = schema.get("type")
    if kinds == kind or (isinstance(kinds, list) and kind in kinds):
        return True
    branches = [b for key in ("anyOf", "oneOf") for b in _listed(schema, key)]
    values = [*_listed(schema, "enum"), *([schema["const"]] if "const" in schema else ())]
    listed = {"string": str, "null": type(None)}.get(kind)
    return any(_admits(b, kind) for b in branches) or (
        listed is not None and any(isinstance(v, listed) for v in values)
    )


def _listed(schema: Mapping[str, Any], key: str) -> list[Any]:
    """A keyword's list, or none where the request's schema (never checked as one) has no list."""
    value = schema.get(key)
    return value if isinstance(value, list) else []


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json would take NaN and Infinity


def typed_value(raw: str, schema: Any) -> Any:
    """An argument as written -> its value, as vLLM reads these formats: null where the schema
    admits null and the text says so; the text itself where it admits a string; else the JSON
    it spells, or the Python literal (a model may write True or {'a': 1}); else the text."""
    if raw.strip() == "null" and _admits(schema, "null"):
        return None
    if _admits(schema, "string"):
        return raw
    for read in (
        lambda: json.loads(raw, parse_constant=_no_constant),
        lambda: ast.literal_eval(raw.strip()),
    ):
        try:
            value = read()
            json.dumps(value, allow_nan=False)  # what JSON can carry: no 1e999, sets, bytes
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        return value
    return raw


def _typed_call(name: str, written: list[tuple[str, str]], tools: ToolSchemas) -> Call | None:
    """A call from its name and (key, value text) pairs, typed by the tool's parameters."""
    if not NAME.fullmatch(name):
        return None
    properties = (tools.get(name) or {}).get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    arguments = {k.strip(): typed_value(v, properties.get(k.strip())) for k, v in written}
    return parse_call({"name": name, "arguments": arguments}, lambda: None)


Written = tuple[str, list[tuple[str, str]]]  # a call's name and its (key, value text) pairs


def _tagged_calls(
    text: str,
    tools: ToolSchemas,
    read: Callable[[str], list[Written] | None],
    tags: tuple[str, str] = (TOOL_CALL, TOOL_CALL_END),
) -> tuple[str | None, list[Call]]:
    """(the text before the first call, or None if there is none; the calls, each block
    between the two `tags` `read` into its calls' names and arguments)."""
    start = text.find(tags[0])
    if start < 0:
        return text, []
    calls = []
    for block in tagged_blocks(text, start, *tags):
        written = read(block)
        if written is None:
            return text, []
        for call in (_typed_call(*w, tools) for w in written):
            if call is None:
                return text, []
            calls.append(call)
    return (content_before(text, start), calls) if calls else (text, [])


def _read_glm45(body: str) -> list[Written] | None:
    name_end = body.find("<arg_key>")
    name = (body if name_end < 0 else body[:name_end]).strip()
    written = "" if name_end < 0 else body[name_end:]
    if not GLM45_ARGUMENTS.fullmatch(written):
        return None
    return [(name, re.findall(GLM45_ARGUMENT, written, re.DOTALL))]


def _without_newlines(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(key, value) pairs without one newline on each side of a value: the format's, not the value's."""
    return [(key, value.removeprefix("\n").removesuffix("\n")) for key, value in pairs]


def _read_qwen3_coder(block: str) -> list[Written] | None:
    function = QWEN3_CODER_CALL.fullmatch(block)
    if function is None:
        return None
    name, body = function[1].strip(), function[2]
    if not QWEN3_CODER_ARGUMENTS.fullmatch(body):
        return None
    return [(name, _without_newlines(re.findall(QWEN3_CODER_ARGUMENT, body, re.DOTALL)))]


def _unquoted(name: str) -> str:
    """A MiniMax name attribute as written, bare or in matching quotes -> the name."""
    name = name.strip()
    quoted = len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'"
    return name[1:-1] if quoted else name


def _read_minimax_m2(block: str) -> list[Written] | None:
    if not MINIMAX_INVOKES.fullmatch(block):
        return None
    calls = []
    for name, body in re.findall(MINIMAX_INVOKE, block, re.DOTALL):
        if not MINIMAX_ARGUMENTS.fullmatch(body):
            return None
        pairs = re.findall(MINIMAX_ARGUMENT, body, re.DOTALL)
        # Values lose all edge whitespace, as MiniMax's own parser (and vLLM's) strips them.
        calls.append((_unquoted(name), [(_unquoted(k), v.strip()) for k, v in pairs]))
    return calls


def glm45_calls(text: str, tools: ToolSchemas) -> tuple[str | None, list[Call]]:
    return _tagged_calls(text, tools, _read_glm45)


def qwen3_coder_calls(text: str, tools: ToolSchemas) -> tuple[str | None, list[Call]]:
    return _tagged_calls(text, tools, _read_qwen3_coder)


def minimax_m2_calls(text: str, tools: ToolSchemas) -> tuple[str | None, list[Call]]:
    return _tagged_calls(text, tools, _read_minimax_m2, MINIMAX_TOOL_CALL)
