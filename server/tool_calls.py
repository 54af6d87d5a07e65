"""Tool calling, as OpenAI's `tools` / `tool_choice`: the request's tools and choice, and forced calls.

The tools go to the chat template, which tells the model how to call them. A forced call (a named
function, or "required") is generated under a JSON schema by structured decoding, so it parses
unless max_tokens or a stop string cuts it short (then it stays text). With `tool_choice` "auto"
the model decides, and its text is parsed for calls (server/tool_parsers.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from engine import RequestError
from engine.guided import MAX_SCHEMA_DEPTH, schema_depth
from server.request_model import RequestModel
from server.tool_call_text import Call

MAX_TOOLS = 128  # OpenAI's limit


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
        since chat templates and grammar compiles recurse through it. `$defs` must map names to
        schemas: "required" lifts each tool's to the top of its forced schema."""
        if value is None:
            return value
        if value.get("type", "object") != "object":
            raise ValueError("must be a JSON schema of type 'object'")
        if not isinstance(value.get("$defs", {}), dict):
            raise ValueError("`$defs` must be an object of named schemas")
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
NAMED_CHOICE = '{"type": "function", "function": {"name": <the name of one of `tools`>}}'


def tool_choice_shape(value: Any) -> Any:
    """A tool_choice object checked for OpenAI's shape before the union parses it, which refused
    one without `function` or its `name` in its first member's words ("Input should be 'none',
    'auto' or 'required'"), saying nothing of what the object lacked."""
    if value is None or isinstance(value, str):
        return value  # the literals' own message lists the strings
    if not isinstance(value, dict):
        raise ValueError(f'must be "none", "auto", "required" or {NAMED_CHOICE}')
    function = value.get("function")
    if value.get("type") != "function":
        problem = '`type` must be "function"'
    elif not isinstance(function, dict):
        problem = "`function` is missing" if function is None else "`function` must be an object"
    elif not isinstance(name := function.get("name"), str):
        problem = (
            "`function.name` is missing" if name is None else "`function.name` must be a string"
        )
    else:
        return value
    raise ValueError(f"{problem}: a named tool choice is {NAMED_CHOICE}")


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
    except (ValueError, RecursionError):  # cut short, or a number past Python's digit limit
        return None
    if isinstance(choice, NamedToolChoice):
        return [Call.new(choice.function.name, text)]
    return [Call.new(item["name"], item["parameters"]) for item in value]
