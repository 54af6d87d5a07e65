"""Kimi-K2's tool calls (`--tool-call-parser kimi_k2`): special-token sections whose calls carry the
id `functions.NAME:INDEX` that Kimi's templates render earlier calls with, whole and streamed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.chat_answer import ChatFormats, answer
from server.chat_requests import ChatCompletionRequest
from server.serving_chat import sampling_params
from server.tool_parsers import TOOL_CALL_PARSERS
from tests.server.test_reasoning import assert_streams_as_whole

KIMI = ChatFormats(TOOL_CALL_PARSERS["kimi_k2"])
SECTION = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")


def kimi_k2_call(name: str, arguments: str, index: int = 0) -> str:
    """One call, as Kimi-K2 writes it inside a section."""
    header = f"functions.{name}:{index}"
    return f"<|tool_call_begin|>{header}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"


def section(*calls: str) -> str:
    return SECTION[0] + "".join(calls) + SECTION[1]


def parsed(text: str) -> tuple[str | None, list[tuple[str, Any, str]]]:
    content, calls = TOOL_CALL_PARSERS["kimi_k2"].parse(text, {})
    return content, [(c.name, json.loads(c.arguments), c.id) for c in calls]


def test_calls_are_parsed_with_their_written_ids() -> None:
    """Kimi's own example: two calls in a section, the text before it the content; the header
    as written is the id, as vLLM returns it and Kimi's templates render it back."""
    text = "Let me check both.\n" + section(
        kimi_k2_call("get_weather", '{"city": "Beijing"}'), kimi_k2_call("get_time", "{}", 1)
    )
    assert parsed(text) == (
        "Let me check both.\n",
        [
            ("get_weather", {"city": "Beijing"}, "functions.get_weather:0"),
            ("get_time", {}, "functions.get_time:1"),
        ],
    )
    assert parsed(section(kimi_k2_call("get_time", "{}", 7))) == (
        None,
        [("get_time", {}, "functions.get_time:7")],
    )
    twice = section(kimi_k2_call("get_time", "{}"), kimi_k2_call("get_time", '{"tz": "UTC"}'))
    first, second = parsed(twice)[1]
    assert first[2] == "functions.get_time:0" and second[2].startswith("call_")  # ids unique


def test_headers_without_the_prefix_spacing_and_the_singular_section() -> None:
    """A bare `NAME:INDEX` header names the function too (its id stays as written); whitespace
    around the header and arguments is the model's, not theirs; the section may open with the
    singular spelling vLLM also accepts, and need not be closed."""
    bare = "<|tool_call_begin|>get_weather:3<|tool_call_argument_begin|>{}<|tool_call_end|>"
    assert parsed(section(bare)) == (None, [("get_weather", {}, "get_weather:3")])
    spaced = (
        "<|tool_call_begin|> functions.get_weather:0\n<|tool_call_argument_begin|>"
        ' {"city": "Oslo"}\n<|tool_call_end|>'
    )
    assert parsed(section(spaced)) == (
        None,
        [("get_weather", {"city": "Oslo"}, "functions.get_weather:0")],
    )
    singular = "Hi.<|tool_call_section_begin|>" + kimi_k2_call("f", "{}")
    assert parsed(singular) == ("Hi.", [("f", {}, "functions.f:0")])
    both = singular + section(kimi_k2_call("g", "{}", 1))  # the calls begin at the first
    assert parsed(both) == ("Hi.", [("f", {}, "functions.f:0"), ("g", {}, "functions.g:1")])


@pytest.mark.parametrize(
    "text",
    [
        section(kimi_k2_call("f", "{oops")),  # not JSON
        section(kimi_k2_call("f", "[1]")),  # not an object
        section(kimi_k2_call("f", '{"a": NaN}')),  # not strict JSON
        section(kimi_k2_call("", "{}")),  # no name
        section("<|tool_call_begin|>functions.f<|tool_call_argument_begin|>{}<|tool_call_end|>"),
        section("<|tool_call_begin|>functions.f:0{}<|tool_call_end|>"),  # no argument marker
        section("<|tool_call_begin|>bad name:0<|tool_call_argument_begin|>{}<|tool_call_end|>"),
        section(kimi_k2_call("f", "{}") + kimi_k2_call("g", "{")),  # a good call, then a bad one
        SECTION[0] + '<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1}',
        "Cut short." + SECTION[0],
        kimi_k2_call("f", "{}"),  # no section
        "Sunny, 21 degrees.",
    ],
)
def test_a_call_that_does_not_parse_leaves_the_text_as_content(text: str) -> None:
    assert TOOL_CALL_PARSERS["kimi_k2"].parse(text, {}) == (text, [])


def request(**body: Any) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_weather", "get_time")]
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, **body}
    )


ANSWERS = [
    section(kimi_k2_call("get_weather", '{"city": "Oslo"}')),
    "Checking both. "
    + section(kimi_k2_call("get_weather", '{"city": "Oslo"}'), kimi_k2_call("get_time", "{}", 1)),
    "Hi.<|tool_call_section_begin|>" + kimi_k2_call("get_time", "{}"),
    "It is sunny.",
    "A call may start: <|tool_calls_sec",  # held back, then text after all
    "Broken. " + section(kimi_k2_call("get_weather", "{oops")),
]


@pytest.mark.parametrize("text", ANSWERS)
def test_a_streamed_answer_adds_up_to_the_whole_one(text: str) -> None:
    assert_streams_as_whole(request(), KIMI, text)


def test_answers_return_the_written_ids_and_keep_special_tokens() -> None:
    result = answer(request(), KIMI, ANSWERS[1], "stop")
    assert result.content == "Checking both. " and result.finish_reason == "tool_calls"
    calls = [(c.id, c.function.name) for c in result.tool_calls or ()]
    assert calls == [
        ("functions.get_weather:0", "get_weather"),
        ("functions.get_time:1", "get_time"),
    ]
    single = answer(request(parallel_tool_calls=False), KIMI, ANSWERS[1], "stop")
    assert len(single.tool_calls or ()) == 1
    assert not sampling_params(request(), KIMI).skip_special_tokens  # the markers are tokens
