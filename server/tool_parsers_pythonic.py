"""Tool calls written as a Python list of calls, the whole answer, as Llama 3.2 and Llama 4 write
them (vLLM's `pythonic` and `llama4_pythonic`):

    [get_weather(city="Paris", unit="c"), lookup(id=3, tags=["a", "b"], opts={"x": None})]

Read with `ast` and never evaluated: keyword arguments only, each a literal (a string, a number,
True/False/None and the JSON spellings true/false/null that models also write, lists, dicts with
string keys). Anything else leaves the whole text as content, with no calls, as vLLM does.
"""

from __future__ import annotations

import ast
from typing import Any

from server.tool_call_text import Call

PYTHONIC_START = "["  # the list: a call only where it opens the answer (`ToolCallFormat.leading`)
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"  # Llama 4's, around the list
JSON_NAMES = {"true": True, "false": False, "null": None}  # as vLLM reads them
JSON_TYPES = (str, int, float, bool)  # not bytes, complex or `...`: JSON cannot hold them


class NotACall(ValueError):
    """The text holds something other than a list of calls with literal arguments."""


def literal(node: ast.expr) -> Any:
    """The JSON-able value a literal spells. One sign on a number is part of the literal (vLLM
    refuses `-1`, which Llama writes for negative numbers); no other operator is."""
    if isinstance(node, ast.Constant) and (node.value is None or type(node.value) in JSON_TYPES):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)  # not -True
    ):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [k.value if isinstance(k, ast.Constant) else None for k in node.keys]  # None: **x
        if all(isinstance(k, str) for k in keys):
            return {k: literal(v) for k, v in zip(keys, node.values, strict=True)}
    raise NotACall(f"not a literal: {ast.dump(node)[:80]}")


def one_call(node: ast.expr) -> Call:
    """`name(key=literal, ...)`: a plain name (vLLM refuses `a.b(...)`), keywords only."""
    if (
        not isinstance(node, ast.Call)
        or not isinstance(node.func, ast.Name)
        or node.args  # f(1), f(*a)
        or any(k.arg is None for k in node.keywords)  # f(**a)
    ):
        raise NotACall("not a call by name with keyword arguments only")
    arguments = {k.arg: literal(k.value) for k in node.keywords}
    return Call.new(node.func.id, arguments)  # ValueError for NaN or an infinity (1e999)


def pythonic_calls(text: str, python_tags: bool = False) -> tuple[str | None, list[Call]]:
    """(None, the calls) when the text, whitespace aside, is a list of calls; else (the text,
    []). `python_tags`: Llama 4's `<|python_start|>`/`<|python_end|>` may wrap the list."""
    body = text.strip()
    if python_tags:
        body = body.removeprefix(PYTHON_START).removesuffix(PYTHON_END).strip()
    if not (body.startswith(PYTHONIC_START) and body.endswith("]")):
        return text, []
    try:
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List):  # `[f()][0]`, `[f()] + [g()]`
            return text, []
        calls = [one_call(e) for e in tree.elts]
    # SyntaxError also for a 5000-digit number; UnicodeEncodeError (a ValueError) for a raw lone
    # surrogate; MemoryError or RecursionError for thousands of nested operators
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return text, []
    return (None, calls) if calls else (text, [])


def llama4_pythonic_calls(text: str) -> tuple[str | None, list[Call]]:
    """As `pythonic_calls`, the list perhaps wrapped in Llama 4's python tags."""
    return pythonic_calls(text, python_tags=True)
