"""Tool calling, as OpenAI's `tools` / `tool_choice` and vLLM's flags for them.

The tools go to the chat template, which tells the model how to call them. A forced call (a named
function, or "required") is generated under a JSON schema by structured decoding, so it always
parses. With `tool_choice` "auto" the model decides; its text is parsed for calls in the format
of `--tool-call-parser` (`hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as
Qwen2.5/Qwen3 and many fine-tunes write them). A call cut short by max_tokens stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from engine import RequestError
from engine.guided import MAX_SCHEMA_DEPTH, schema_depth
from server.request_model import RequestModel

TOOL_CALL_PARSERS = ("hermes",)
MAX_TOOLS = 128  # OpenAI's limit
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _too_deep(value: Any) -> bool:
    try:
        return schema_depth(value) > MAX_SCHEMA_DEPTH
    except RecursionError:
        return True


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; None: no arguments
    strict: bool | None = None  # a forced call always follows the schema

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Arguments are a JSON object (OpenAI's rule); nesting is bounded as for response_format,
        since chat templates and grammar compiles recurse through it."""
        if value is None:
            return value
        if value.get("type", "object") != "object":
            raise ValueError("must be a JSON schema of type 'object'")
        if _too_deep(value):
            raise ValueError(f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
        return value


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class FunctionCallIn(RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it back

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"must be JSON text: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object")
        if _too_deep(parsed):  # chat templates recurse through it
            raise ValueError(f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
        return value


class ToolCallIn(RequestModel):
    """A call the assistant made earlier in the conversation."""

    id: str
    type: Literal["function"]
    function: FunctionCallIn

    def template_dict(self) -> dict[str, Any]:
        """Templates (Qwen, Llama 3.1, ...) expect arguments as an object, not JSON text."""
        arguments = json.loads(self.function.arguments)
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": arguments},
        }


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text
    id: str

    @classmethod
    def new(cls, name: str, arguments: Any) -> Call:
        text = (
            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        )
        return cls(name, text, f"call_{uuid.uuid4().hex[:24]}")


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def forced_schema(tools: list[Tool], choice: ToolChoice | None, parallel: bool) -> str | None:
    """The JSON schema a forced call is generated under; None when the model may answer freely.
    "required" is a non-empty array of {name, parameters} objects, one shape per tool, of one
    item unless parallel calls are allowed. Each tool's `$defs` move to the top, where its
    `#/$defs/...` references resolve; two tools defining one name differently are refused."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return json.dumps(_parameters(tool))
    if choice != "required":
        return None
    shapes, defs = [], {}
    for t in tools:
        parameters = dict(_parameters(t))
        for name, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise RequestError(f"tools define $defs/{name} differently", param="tools")
        shapes.append(
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "parameters": parameters},
                "required": ["name", "parameters"],
            }
        )
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": shapes}}
    if not parallel:
        array["maxItems"] = 1
    if defs:
        array["$defs"] = defs
    return json.dumps(array)


def forced_calls(text: str, choice: ToolChoice) -> list[Call] | None:
    """The calls of a forced generation; None when it did not finish as valid JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(choice, NamedToolChoice):
        return [Call.new(choice.function.name, text)]
    return [Call.new(item["name"], item["parameters"]) for item in value]


def hermes_calls(text: str) -> tuple[str | None, list[Call]]:
    """(the text before the first call, or None if there is none; the calls) of a free generation.
    A block that is not a JSON object with a name stays text (no calls are returned)."""
    calls = []
    for block in HERMES_CALL.findall(text):
        try:
            value = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return text, []
        if not isinstance(value.get("arguments", {}), dict):
            return text, []
        calls.append(Call.new(value["name"], value.get("arguments", {})))
    if not calls:
        return text, []
    content = text[: text.index(HERMES_START)]
    return content if content.strip() else None, calls


class ToolCallStream:
    """One streamed choice of a request with tools: which text may go out now. A forced call is
    held back whole; in "auto" mode text streams until a call may be starting (a partial
    `<tool_call>` is held until it is certain), and everything from the call on is held."""

    def __init__(self, forced: bool) -> None:
        self.forced, self.sent, self.in_call = forced, 0, False

    def feed(self, text: str) -> str:
        """`text`: the choice's whole text so far -> the new part that may be streamed."""
        if self.forced or self.in_call:
            return ""
        start = text.find(HERMES_START, self.sent)
        if start >= 0:
            self.in_call = True
            out, self.sent = text[self.sent : start], start
            return out
        safe = len(text)
        for k in range(len(HERMES_START) - 1, 0, -1):  # hold a suffix that may begin the tag
            if text.endswith(HERMES_START[:k]):
                safe = len(text) - k
                break
        out, self.sent = text[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return out
