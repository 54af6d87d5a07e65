"""MiniMax-M2's chat output (`--tool-call-parser minimax_m2`, `--reasoning-parser minimax_m2`): its
XML tool calls typed by the request's tools, whole and streamed, after the reasoning its prompt
opens with `<think>\\n`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.chat_answer import ChatFormats, answer
from server.chat_requests import ChatCompletionRequest
from server.reasoning import REASONING_PARSERS
from server.serving_chat import sampling_params
from server.tool_parsers import TOOL_CALL_PARSERS
from server.tool_parsers_xml import minimax_m2_calls
from tests.server.test_reasoning import assert_streams_as_whole

MINIMAX = ChatFormats(TOOL_CALL_PARSERS["minimax_m2"], REASONING_PARSERS["minimax_m2"])
PROMPT = "]~!b[]~b]system\nYou are helpful.[e~[\n]~b]user\nWeather?[e~[\n]~b]ai\n<think>\n"
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string"},
        "days": {"type": "integer"},
        "threshold": {"type": "number"},
        "celsius": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer"}},
        "options": {"type": "object"},
        "note": {"type": ["string", "null"]},
        "since": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
}
SEARCH_WEB = {
    "type": "object",
    "properties": {
        "query_tag": {"type": "array", "items": {"type": "string"}},
        "query_list": {"type": "array", "items": {"type": "string"}},
    },
}
TOOLS = {"get_weather": WEATHER, "search_web": SEARCH_WEB}


def minimax_m2_call(name: str, arguments: dict[str, str]) -> str:
    """One call in its own block, as MiniMax-M2's template renders earlier calls."""
    written = "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in arguments.items())
    return f'<minimax:tool_call>\n<invoke name="{name}">\n{written}</invoke>\n</minimax:tool_call>'


def parsed(text: str) -> tuple[str | None, list[tuple[str, Any]]]:
    content, calls = minimax_m2_calls(text, TOOLS)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def test_several_invokes_in_a_block_and_several_blocks() -> None:
    """MiniMax's own example: two calls in one block; then a second block, names quoted either
    way or bare; the text before the first block is the content."""
    text = (
        "Let me look both up.\n"
        "<minimax:tool_call>\n"
        '<invoke name="search_web">\n'
        '<parameter name="query_tag">["technology", "events"]</parameter>\n'
        '<parameter name="query_list">["\\"OpenAI\\" \\"latest\\" \\"release\\""]</parameter>\n'
        "</invoke>\n"
        "<invoke name='get_weather'>\n"
        "<parameter name='location'>San Francisco</parameter>\n"
        "</invoke>\n"
        "</minimax:tool_call>\n"
        "<minimax:tool_call><invoke name=get_weather><parameter name=location>Oslo</parameter>"
        "</invoke></minimax:tool_call>"
    )
    assert parsed(text) == (
        "Let me look both up.\n",
        [
            (
                "search_web",
                {
                    "query_tag": ["technology", "events"],
                    "query_list": ['"OpenAI" "latest" "release"'],
                },
            ),
            ("get_weather", {"location": "San Francisco"}),
            ("get_weather", {"location": "Oslo"}),
        ],
    )
    assert parsed(minimax_m2_call("get_weather", {}))[0] is None  # nothing before the call
    assert parsed(minimax_m2_call("get_time", {})) == (None, [("get_time", {})])


def test_values_take_their_types_from_the_tools() -> None:
    """Values are written untyped: each is typed by its parameter's schema as qwen3_coder's are
    (a string stays its text, "null" is null only where the schema admits null); a value's edge
    whitespace is dropped, as MiniMax's own parser drops it."""
    values = {
        "location": "007",
        "days": "3",
        "threshold": "-2.5",
        "celsius": "true",
        "hours": "[6, 12]",
        "options": '{"units": "metric", "alerts": [1]}',
        "note": "null",
        "since": "null",
        "extra": "{'a': (1, 2)}",  # no schema: the Python literal it spells
    }
    [(name, arguments)] = parsed(minimax_m2_call("get_weather", values))[1]
    assert (name, arguments) == (
        "get_weather",
        {
            "location": "007",
            "days": 3,
            "threshold": -2.5,
            "celsius": True,
            "hours": [6, 12],
            "options": {"units": "metric", "alerts": [1]},
            "note": None,
            "since": None,
            "extra": {"a": [1, 2]},
        },
    )
    code = "\n  def f():\n      return 1\n\n"
    spaced = minimax_m2_call("get_weather", {"location": code, "days": "oops", "note": "null "})
    assert parsed(spaced)[1] == [
        ("get_weather", {"location": "def f():\n      return 1", "days": "oops", "note": None})
    ]
    unknown = minimax_m2_call("get_time", {"zone": "null", "offset": "2"})
    assert parsed(unknown)[1] == [("get_time", {"zone": None, "offset": 2})]  # no schema: JSON


@pytest.mark.parametrize(
    "text",
    [
        '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="location">Oslo',  # cut
        '<minimax:tool_call>\n<invoke name="get_weather">\n</minimax:tool_call>',  # invoke open
        '<minimax:tool_call><invoke name="get_weather"><parameter name="a">1</invoke>'
        "</minimax:tool_call>",  # a parameter left open
        '<minimax:tool_call><invoke name="">\n</invoke></minimax:tool_call>',  # no name
        "<minimax:tool_call><invoke>\n</invoke></minimax:tool_call>",  # no name attribute
        '<minimax:tool_call><invoke name="get weather"></invoke></minimax:tool_call>',
        "<minimax:tool_call><invoke name=\"get_weather'></invoke></minimax:tool_call>",
        '<minimax:tool_call>stray<invoke name="f"></invoke></minimax:tool_call>',
        '<minimax:tool_call><invoke name="f">stray<parameter name="a">1</parameter></invoke>'
        "</minimax:tool_call>",
        '<minimax:tool_call>{"name": "f", "arguments": {}}</minimax:tool_call>',  # hermes' JSON
        "<minimax:tool_call>\n<function=f>\n</function>\n</minimax:tool_call>",  # qwen3_coder's
        '<tool_call><invoke name="f"></invoke></tool_call>',  # another format's block
        "<minimax:tool_call>\n</minimax:tool_call>",  # a block with no call
        minimax_m2_call("f", {"a": "1"}) + "<minimax:tool_call><invoke>x</invoke>"
        "</minimax:tool_call>",  # a good block, then a broken one
        '<minimax:tool_call><invoke name="f"></invoke><invoke name="a b"></invoke>'
        "</minimax:tool_call>",  # a good call, then one with no valid name
        "Sunny, 21 degrees.",
    ],
)
def test_a_block_that_does_not_parse_leaves_the_text_as_content(text: str) -> None:
    assert minimax_m2_calls(text, TOOLS) == (text, [])


def test_the_prompt_opens_the_reasoning() -> None:
    """The template's `]~b]ai\\n<think>\\n` opens a think block; with thinking turned off (an
    empty block closed in the prompt) the answer is content; with no marker it still thinks."""
    reasoning = REASONING_PARSERS["minimax_m2"]
    assert reasoning.starts_open(PROMPT) is True
    assert reasoning.starts_open(PROMPT + "</think>\n\n") is False
    assert reasoning.starts_open("]~b]user\nhi[e~[\n]~b]ai\n") is True
    assert reasoning.split("It is cold.\n</think>\n\nBring a coat.", True, True) == (
        "It is cold.\n",
        "\n\nBring a coat.",
    )
    assert reasoning.split("Still thinking", True, True) == ("Still thinking", None)


def request(**body: Any) -> ChatCompletionRequest:
    tools = [
        {"type": "function", "function": {"name": n, "parameters": p}} for n, p in TOOLS.items()
    ]
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, **body}
    )
    chat.reasoning_open = REASONING_PARSERS["minimax_m2"].starts_open(PROMPT)  # as the server does
    return chat


ANSWERS = [
    "The user wants the weather.\n</think>\n\n"
    + minimax_m2_call("get_weather", {"location": "Oslo", "days": "2"}),
    "Two places.\n</think>\n\nChecking both.\n<minimax:tool_call>\n"
    '<invoke name="get_weather">\n<parameter name="location">Oslo</parameter>\n</invoke>\n'
    '<invoke name="get_weather">\n<parameter name="celsius">false</parameter>\n</invoke>\n'
    "</minimax:tool_call>",
    "Easy.\n</think>\n\nIt is sunny.",
    "Hm.\n</think>\n\nA call may start: <minimax:tool_",  # held back, then text after all
    "Broken.\n</think>\n\n<minimax:tool_call><invoke>x</invoke></minimax:tool_call>",
    "Thinking of calling " + minimax_m2_call("get_weather", {}) + " but cut short",
]


@pytest.mark.parametrize("text", ANSWERS)
def test_a_streamed_answer_adds_up_to_the_whole_one(text: str) -> None:
    assert_streams_as_whole(request(), MINIMAX, text)


def test_calls_come_after_the_reasoning() -> None:
    """Calls are parsed out of the content after `</think>`; one written while thinking is
    reasoning. The markers are plain text, so special tokens are skipped as usual."""
    result = answer(request(), MINIMAX, ANSWERS[1], "stop")
    assert (result.reasoning, result.content) == ("Two places.\n", "\n\nChecking both.\n")
    assert result.finish_reason == "tool_calls"
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in result.tool_calls or ()]
    assert calls == [("get_weather", {"location": "Oslo"}), ("get_weather", {"celsius": False})]
    only_call = answer(request(), MINIMAX, ANSWERS[0], "stop")
    assert only_call.content is None and only_call.tool_calls is not None
    thinking = answer(request(), MINIMAX, ANSWERS[-1], "stop")
    assert thinking.tool_calls is None and thinking.reasoning == ANSWERS[-1]
    single = answer(request(parallel_tool_calls=False), MINIMAX, ANSWERS[1], "stop")
    assert len(single.tool_calls or ()) == 1
    assert sampling_params(request(), MINIMAX).skip_special_tokens
