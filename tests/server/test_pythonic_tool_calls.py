"""`--tool-call-parser pythonic|llama4_pythonic`: the whole answer a Python list of calls, as Llama
3.2 and Llama 4 write them, read without evaluating anything; and streamed, where only a list
that opens the answer is held back."""

from __future__ import annotations

import json
import keyword
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.chat_answer import ChatFormats, ChoiceStream
from server.generations import ChoiceDelta
from server.serving_chat import sampling_params
from server.tool_parsers import TOOL_CALL_PARSERS, ToolCallStream
from tests.server.test_reasoning import assert_streams_as_whole, chat, stream_whole

PYTHONIC = ("pythonic", "llama4_pythonic")
WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def pythonic_call(name: str, arguments: dict[str, str]) -> str:
    """A one-call list; `arguments`' values are Python literals as written."""
    return f"[{name}(" + ", ".join(f"{k}={v}" for k, v in arguments.items()) + ")]"


def pythonic_written(name: str, arguments: dict[str, Any]) -> str:
    """A one-call list with `arguments` as Python writes them (`repr`: NaN as `nan`, which is
    no literal). A keyword cannot name an argument in Python, so a model writes `if_`."""
    written = {f"{k}_" if keyword.iskeyword(k) else k: repr(v) for k, v in arguments.items()}
    return pythonic_call(name, written)


def parsed(parser: str, text: str) -> tuple[str | None, list[tuple[str, Any]]]:
    content, calls = TOOL_CALL_PARSERS[parser].parse(text, {})
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser", PYTHONIC)
def test_a_list_of_calls_is_the_calls(parser: str) -> None:
    text = (
        '\n[get_weather(city="Paris", unit=\'c\'), lookup(id=3, tags=["a", "b"],'
        ' opts={"x": None, "y": {"z": [1.5, -2, +3]}}, ok=True, no=False), get_time()] '
    )
    assert parsed(parser, text) == (
        None,  # nothing else is allowed in the answer
        [
            ("get_weather", {"city": "Paris", "unit": "c"}),
            (
                "lookup",
                {
                    "id": 3,
                    "tags": ["a", "b"],
                    "opts": {"x": None, "y": {"z": [1.5, -2, 3]}},
                    "ok": True,
                    "no": False,
                },
            ),
            ("get_time", {}),
        ],
    )
    calls = TOOL_CALL_PARSERS[parser].parse(text, {})[1]
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == 3
    json_names = "[f(a=true, b=false, c=null, d=[null])]"  # as models also write them, and vLLM
    assert parsed(parser, json_names) == (
        None,
        [("f", {"a": True, "b": False, "c": None, "d": [None]})],
    )
    [call] = TOOL_CALL_PARSERS[parser].parse('[f(a="\\udc00 é\\n")]', {})[1]
    assert call.arguments.encode() and json.loads(call.arguments) == {"a": "\udc00 é\n"}


def test_llama4_python_tags_wrap_the_list() -> None:
    """Llama 4 may write its special tokens around the list, when a request keeps them."""
    for text in (
        "<|python_start|>[f(a=1)]<|python_end|>",
        " <|python_start|>\n[f(a=1)]\n<|python_end|>\n",
        "<|python_start|>[f(a=1)]",
        "[f(a=1)]<|python_end|>",
    ):
        assert parsed("llama4_pythonic", text) == (None, [("f", {"a": 1})])
        assert parsed("pythonic", text) == (text, [])  # Llama 3.2's has no such tokens
    for text in ("<|python_start|>", "<|python_start|>Hi", "<|python_start|>[f(1)]<|python_end|>"):
        assert parsed("llama4_pythonic", text) == (text, [])
    for parser in PYTHONIC:  # they are special tokens, skipped from the text by default
        formats = ChatFormats(TOOL_CALL_PARSERS[parser])
        assert sampling_params(chat({"tools": [WEATHER]}), formats).skip_special_tokens


NOT_CALLS = [
    "plain text",
    "",
    "Sure: [f(a=1)]",  # text before: the list is no answer of calls
    "[f(a=1)] is what I would call",
    "[]",
    "[f(a=1), 3]",
    "[f(a=1) g(b=2)]",
    "[f(a=1)",
    "[f()][0]",
    "(f(a=1),)",
    "[f(1)]",  # positional arguments
    "[f(1, a=2)]",
    "[f(*a)]",
    "[f(**a)]",
    "[f(**{'a': 1})]",
    "[a.b(c=1)]",  # a plain name only, as vLLM reads it
    "[f(a=1)(b=2)]",
    "[f(x=y)]",  # a name is no literal
    "[f(x=1+2)]",
    "[f(x=--1)]",
    "[f(x=-True)]",
    "[f(x=not 1)]",
    "[f(x=(1, 2))]",
    "[f(x={1, 2})]",
    "[f(x={1: 2})]",  # JSON keys are strings
    "[f(x={**d})]",
    "[f(x=b'1')]",
    "[f(x=1j)]",
    "[f(x=...)]",
    "[f(x=1e999)]",  # an infinity, as nan and inf would be: not JSON
    "[f(x=nan)]",
    "[f(x=[i for i in 'ab'])]",
    "[f(x=lambda: 1)]",
    '[f(x=f"{1}")]',
    "[f(x=__import__('sys').exit(3))]",  # evaluated, it would end the tests
    "[f(x=1, y=2 if 1 else 3)]",
    "[f(x='\0')]",  # a null byte
    '[f(a="\udc00")]',  # a lone surrogate as written, not escaped: no source ast can read
    "[f(a=" + "9" * 5000 + ")]",  # a number json and Python refuse
]


@pytest.mark.parametrize("parser", PYTHONIC)
@pytest.mark.parametrize("text", NOT_CALLS)
def test_what_is_no_list_of_literal_calls_stays_text(parser: str, text: str) -> None:
    assert TOOL_CALL_PARSERS[parser].parse(text, {}) == (text, [])


@pytest.mark.parametrize("parser", PYTHONIC)
def test_calls_that_do_not_parse_fail_quickly(parser: str) -> None:
    """Thousands of nested brackets or operators, or of calls with one bad one at the end: ast
    refuses them (SyntaxError, MemoryError) or reads them in linear time (about 35 us a call)."""
    parse = TOOL_CALL_PARSERS[parser].parse
    texts = [
        "[" * 100_000 + "]" * 100_000,
        "[f(a=" + "[" * 100_000 + "]" * 100_000 + ")]",
        "[f(a=" + "-" * 100_000 + "1)]",
        "[f(a=" + "not " * 100_000 + "1)]",
        "[" + "f(a=[1, {'b': 'c'}]), " * 2000 + "f(1)]",
        "[" * 8000,
    ]
    start = time.perf_counter()
    for text in texts:
        assert parse(text, {}) == (text, [])
    assert time.perf_counter() - start < 1.0


FINITE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.sampled_from(["a", "é", "\udc00", '"', "'", "\\", "\n", "\0", "[", ")"])),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    parser=st.sampled_from(PYTHONIC),
    calls=st.lists(st.tuples(NAMES, st.dictionaries(NAMES, FINITE, max_size=4)), max_size=3),
)
def test_any_literal_arguments_come_back_as_written(
    parser: str, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    """Whatever JSON values a call's arguments hold, written as Python writes them, the call
    gives them back: names, order and values (a lone surrogate escaped in the JSON text)."""
    text = "[" + ", ".join(pythonic_written(n, a)[1:-1] for n, a in calls) + "]"
    content, found = TOOL_CALL_PARSERS[parser].parse(text, {})
    assert [(c.name, json.loads(c.arguments)) for c in found] == calls
    assert content == (None if calls else text)  # no calls: `[]` is text
    assert all(c.arguments.encode() for c in found)


def leading_stream(parser: str) -> ToolCallStream:
    tools = TOOL_CALL_PARSERS[parser]
    return ToolCallStream(tools.starts, leading=tools.leading)


@pytest.mark.parametrize("parser", PYTHONIC)
def test_only_a_list_that_opens_the_answer_is_held(parser: str) -> None:
    """Content that does not open with `[` streams as written, a `[` later on included; a
    leading `[` (after whitespace) holds everything, until the answer ends."""
    plain, text, sent = leading_stream(parser), "", []
    for piece in ["Sure", " [1]", " and [", "f(a=1)]"]:
        text += piece
        sent.append(plain.feed(text))
    assert sent == ["Sure", " [1]", " and [", "f(a=1)]"] and not plain.in_call
    spaced = leading_stream(parser)
    assert [spaced.feed(t) for t in ["\n", "\n ", "\n Hi"]] == ["", "", "\n Hi"]
    call = leading_stream(parser)
    assert [call.feed(t) for t in [" ", " [", ' [f(a="x")]']] == ["", "", ""]
    assert call.in_call and call.sent == 0  # all of it held: a call, or text at the end
    assert leading_stream(parser).feed("[TOOL_CALLS] x") == ""  # a list, for all we know


def test_llama4_holds_a_python_tag_and_what_may_start_one() -> None:
    stream = leading_stream("llama4_pythonic")
    assert [stream.feed(t) for t in ["<", "<|py", "<|python_start|>"]] == ["", "", ""]
    assert stream.in_call
    assert leading_stream("llama4_pythonic").feed("<|pie") == "<|pie"  # no tag after all
    assert leading_stream("pythonic").feed("<|py") == "<|py"  # skipped tokens: never seen


@pytest.mark.parametrize("parser", PYTHONIC)
@pytest.mark.parametrize(
    "text",
    [
        '[get_weather(city="Oslo"), get_time()]',
        "\n\n[get_time(tz=None)]\n",
        "The list is [1, 2].",
        "[1, 2] is the list.",
        "[get_time(tz=zone)]",
        "  ",
    ],
)
def test_streamed_answers_add_up_to_the_whole(parser: str, text: str) -> None:
    formats = ChatFormats(TOOL_CALL_PARSERS[parser])
    request = chat({"tools": [WEATHER]}, reasoning_open=None)
    assert_streams_as_whole(request, formats, text)


@pytest.mark.parametrize("parser", PYTHONIC)
def test_content_streams_as_it_comes(parser: str) -> None:
    """Through a chat stream, a character at a time: content goes out with each delta; a list
    of calls goes out whole with the last, as calls."""
    formats, request = ChatFormats(TOOL_CALL_PARSERS[parser]), chat({"tools": [WEATHER]})
    stream, text = ChoiceStream(request, formats), " Oslo [no call] is cold"
    chunks = [stream.advance(ChoiceDelta(0, char, None, None)) for char in text]
    sent = [None if chunk is None else chunk.delta.content for chunk in chunks]
    assert sent == [None, " O", *text[2:]]  # the leading space waits for a word
    called = stream_whole(request, formats, '[get_weather(city="Oslo")]')
    assert called["content"] == "" and called["finish"] == "tool_calls"
    assert [c[1:] for c in called["calls"]] == [("get_weather", '{"city": "Oslo"}')]
