"""Tool calling: the hermes parser and stream splitter on their own, then through the server with a
template that renders tools (a random model calls tools only when a call is forced, so "auto" is
checked for what it renders and returns as text)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.chat_answer import ChatFormats, answer
from server.chat_requests import ChatCompletionRequest
from server.reasoning import REASONING_PARSERS
from server.serving_chat import sampling_params
from server.tool_parsers import TOOL_CALL_PARSERS, ToolCallStream, hermes_calls, mistral_calls
from server.tool_parsers_xml import glm45_calls, qwen3_coder_calls
from tests.server.test_kimi_k2 import kimi_k2_call, section
from tests.server.test_minimax_m2 import minimax_m2_call
from tests.server.test_pythonic_tool_calls import PYTHONIC, pythonic_call, pythonic_written

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

TEMPLATE = (
    "{% if tools %}<|system|>{{ tools | tojson }}<|end|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|user|>{{ m.tool_call_id }}: {{ m.content }}<|end|>"
    "{% elif m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|end|>"
    "{% else %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def test_hermes_calls_are_parsed_out_of_text() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>{"name": "get_time"}</tool_call>'
    content, calls = hermes_calls(text)
    assert content == "Let me check.\n"  # as streamed: the text before the first call
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {}),
    ]
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id
    assert hermes_calls("no calls here") == ("no calls here", [])
    for broken in (
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    ):
        assert hermes_calls(broken) == (broken, [])  # a malformed call stays text


def test_calls_cut_short_by_max_tokens_end_with_length() -> None:
    """The parsed calls are returned; "length" tells the client the answer was cut (a call after
    them may be missing), as a plain answer cut short says."""
    request = ChatCompletionRequest(messages=MESSAGES, tools=[WEATHER, TIME])
    formats = ChatFormats(TOOL_CALL_PARSERS["hermes"])
    text = '<tool_call>{"name": "get_time"}</tool_call>\n<tool_call>\n{"name": "get_weather", "ar'
    for finish_reason, shown in (("length", "length"), ("stop", "tool_calls")):
        result = answer(request, formats, text, finish_reason)
        assert [c.function.name for c in result.tool_calls or ()] == ["get_time"]
        assert result.finish_reason == shown


def test_mistral_calls_are_parsed_out_of_text() -> None:
    text = 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    content, calls = mistral_calls(text)
    assert content == "Sure. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {}),
    ]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # Mistral's templates check
    one = mistral_calls('[TOOL_CALLS] {"name": "get_time", "arguments": {}}')
    assert one[0] is None and [c.name for c in one[1]] == ["get_time"]
    for broken in ("[TOOL_CALLS] [{", '[TOOL_CALLS] [{"name": 3}]', "no calls"):
        assert mistral_calls(broken) == (broken, [])
    kept_eos = '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]</s>'  # include_stop_str
    assert [c.name for c in mistral_calls(kept_eos)[1]] == ["get_time"]


def deepseek_v3_call(name: str, arguments: str) -> str:
    return (
        f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{arguments}\n```"
        "<｜tool▁call▁end｜>"
    )


def deepseek_v31_call(name: str, arguments: str) -> str:
    return f"<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>"


def harmony_call(name: str, arguments: str) -> str:
    """A gpt-oss call as `--reasoning-parser openai_gptoss` leaves it in the content."""
    header = f"assistant<|channel|>commentary to=functions.{name} <|constrain|>json"
    return f"<|start|>{header}<|message|>{arguments}<|call|>"


@pytest.mark.parametrize(
    ("parser", "call"),
    [("deepseek_v3", deepseek_v3_call), ("deepseek_v31", deepseek_v31_call)],
)
def test_deepseek_calls_are_parsed_out_of_text(parser: str, call: Callable) -> None:
    parse = TOOL_CALL_PARSERS[parser].parse
    text = (
        "Checking.<｜tool▁calls▁begin｜>"
        + call("get_weather", '{"city": "Oslo"}')
        + call("get_time", "{}")
        + "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    )
    content, calls = parse(text, {})
    assert content == "Checking."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {}),
    ]
    other = deepseek_v31_call if call is deepseek_v3_call else deepseek_v3_call
    for broken in (
        "<｜tool▁calls▁begin｜>" + call("f", "{oops"),
        "<｜tool▁calls▁begin｜>" + call("f", "[1]"),
        "<｜tool▁calls▁begin｜>" + other("f", "{}"),  # the other version's format
        "<｜tool▁calls▁begin｜>cut",
        "plain",
    ):
        assert parse(broken, {}) == (broken, [])


def glm45_call(name: str, arguments: dict[str, str]) -> str:
    written = "".join(
        f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in arguments.items()
    )
    return f"<tool_call>{name}\n{written}</tool_call>"


SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer"},
        "exact": {"type": "boolean"},
        "filters": {"type": "object"},
        "note": {"type": ["string", "null"]},
        "tag": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "code": {"enum": ["1", "2"]},
    },
}


def test_glm45_calls_take_their_types_from_the_tools() -> None:
    """GLM writes string arguments unquoted: "007" stays a string where the schema says string,
    and other values are the JSON they spell (or their text when they spell none)."""
    text = (
        "Looking.\n"
        + glm45_call(
            "search",
            {
                "query": "007",
                "limit": "3",
                "exact": "true",
                "filters": '{"year": [1962]}',
                "note": "null",
                "tag": "42",
                "code": "1",
                "extra": "not json",
            },
        )
        + "<tool_call>get_time</tool_call>"  # no arguments, as GLM-4.6 writes it
    )
    content, calls = glm45_calls(text, {"search": SEARCH})
    assert content == "Looking.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        (
            "search",
            {
                "query": "007",
                "limit": 3,
                "exact": True,
                "filters": {"year": [1962]},
                "note": None,  # a nullable string: "null" is null, as vLLM reads it
                "tag": "42",
                "code": "1",
                "extra": "not json",
            },
        ),
        ("get_time", {}),
    ]
    python = {"exact": "True", "filters": "{'year': (1962,)}", "limit": "{1, 2}", "big": "1e999"}
    [literal] = glm45_calls(glm45_call("search", python), {"search": SEARCH})[1]
    assert json.loads(literal.arguments) == {  # what JSON can carry; a set or 1e999 cannot
        "exact": True,
        "filters": {"year": [1962]},
        "limit": "{1, 2}",
        "big": "1e999",
    }
    untyped = glm45_calls(glm45_call("search", {"query": "42"}), {})[1]
    assert json.loads(untyped[0].arguments) == {"query": 42}  # no schema: read as JSON
    for broken in (
        "<tool_call>search\n<arg_key>query</arg_key>",  # cut short
        "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",  # no name
        "<tool_call>search\nstray<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
        "<tool_call>search\n<arg_key>a</arg_key>1</tool_call>",  # a key without a value
        '<tool_call>{"name": "search"}</tool_call>',  # another format's call: not a name
        "plain",
    ):
        assert glm45_calls(broken, {"search": SEARCH}) == (broken, [])
    [odd] = glm45_calls(glm45_call("f", {"a": "1"}), {"f": {"properties": ["a"]}})[1]
    assert json.loads(odd.arguments) == {"a": 1}  # a schema that is no schema types nothing


def qwen3_coder_call(name: str, arguments: dict[str, str]) -> str:
    written = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{written}</function>\n</tool_call>"


def test_qwen3_coder_calls_take_their_types_from_the_tools() -> None:
    """Qwen3-Coder's XML calls: values typed by the schema as GLM's, multi-line text kept, the
    template's newline on each side of a value dropped."""
    code = "def f():\n    return 1\n"
    text = (
        "I will search.\n"
        + qwen3_coder_call("search", {"query": "007", "limit": "3", "note": code})
        + qwen3_coder_call("get_time", {})
    )
    content, calls = qwen3_coder_calls(text, {"search": SEARCH})
    assert content == "I will search.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("search", {"query": "007", "limit": 3, "note": code}),
        ("get_time", {}),
    ]
    assert TOOL_CALL_PARSERS["qwen3_coder"].parse(text, {"search": SEARCH})[1] != []
    for broken in (
        "<tool_call>\n<function=search>\n<parameter=query>\nx\n</function>\n</tool_call>",
        "<tool_call>\n<function=bad name>\n</function>\n</tool_call>",
        "<tool_call>\n<function=search>\nstray<parameter=a>1</parameter></function></tool_call>",
        '<tool_call>{"name": "search", "arguments": {}}</tool_call>',  # hermes' format
        "plain",
    ):
        assert qwen3_coder_calls(broken, {"search": SEARCH}) == (broken, [])


def test_calls_that_do_not_parse_fail_quickly() -> None:
    """Arguments never cross their closing tags, so a broken call is rejected in linear time
    (a backtracking pattern took seconds at 16 arguments)."""
    arguments = "".join(f"<arg_key>k{i}</arg_key><arg_value>v</arg_value>" for i in range(2000))
    broken = f"<tool_call>f\n{arguments}x</tool_call>"
    parameters = "".join(f"<parameter=k{i}>v</parameter>" for i in range(2000))
    coder = f"<tool_call><function=f>{parameters}x</function></tool_call>"
    invoke = "".join(f'<parameter name="k{i}">v</parameter>' for i in range(2000))
    minimax = f'<minimax:tool_call><invoke name="f">{invoke}x</invoke></minimax:tool_call>'
    repeating = "<tool_call>" * 8000  # a model stuck repeating a one-token marker
    deepseek = "<｜tool▁calls▁begin｜>" + "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{" * 8000
    kimi = (
        "<|tool_calls_section_begin|>"
        + "<|tool_call_begin|>f:0<|tool_call_argument_begin|>{" * 8000
    )
    kimi_closed = kimi + "<|tool_call_end|>"  # one block holding every other call's markers
    start = time.perf_counter()
    assert glm45_calls(broken, {}) == (broken, [])
    assert qwen3_coder_calls(coder, {}) == (coder, [])
    assert TOOL_CALL_PARSERS["minimax_m2"].parse(minimax, {}) == (minimax, [])
    for parser in ("hermes", "glm45", "qwen3_coder"):
        assert TOOL_CALL_PARSERS[parser].parse(repeating, {}) == (repeating, [])
    blocks = "<minimax:tool_call>" * 8000 + '<invoke name="f">' * 8000
    assert TOOL_CALL_PARSERS["minimax_m2"].parse(blocks, {}) == (blocks, [])
    assert TOOL_CALL_PARSERS["deepseek_v31"].parse(deepseek, {}) == (deepseek, [])
    for text in (kimi, kimi_closed):
        assert TOOL_CALL_PARSERS["kimi_k2"].parse(text, {}) == (text, [])
    assert time.perf_counter() - start < 1.0  # each took 10-30 s before: quadratic or worse


def test_nan_and_infinity_never_reach_the_arguments() -> None:
    """Python's json reads and writes them, strict JSON parsers do not: a hermes call holding
    one stays text, and an untyped GLM value spelling one stays a string."""
    nan_call = '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>'
    assert hermes_calls(nan_call) == (nan_call, [])
    [call] = glm45_calls(glm45_call("f", {"a": "Infinity", "b": "-Infinity"}), {})[1]
    assert json.loads(call.arguments) == {"a": "Infinity", "b": "-Infinity"}


def test_glm45_answers_type_arguments_by_the_request_tools() -> None:
    """Through a chat answer, after GLM's reasoning: the request's own tools type the call."""
    tool = {"type": "function", "function": {"name": "search", "parameters": SEARCH}}
    request = ChatCompletionRequest.model_validate({"messages": MESSAGES, "tools": [tool]})
    formats = ChatFormats(TOOL_CALL_PARSERS["glm45"], REASONING_PARSERS["glm45"])
    text = "<think>Find it.</think>" + glm45_call("search", {"query": "42", "limit": "42"})
    result = answer(request, formats, text, "stop")
    assert result.reasoning == "Find it." and result.finish_reason == "tool_calls"
    [call] = result.tool_calls or []
    assert json.loads(call.function.arguments) == {"query": "42", "limit": 42}
    assert not sampling_params(request, formats).skip_special_tokens


UNTYPED = {"glm45": glm45_call, "qwen3_coder": qwen3_coder_call, "minimax_m2": minimax_m2_call}


@pytest.mark.parametrize("parser", sorted(TOOL_CALL_PARSERS))
def test_odd_model_json_is_text_or_safe_to_send(parser: str) -> None:
    """A 5000-digit number (json refuses it with a ValueError) stays text; a lone surrogate the
    model escaped stays escaped, so the answer can be sent as UTF-8."""
    parse = TOOL_CALL_PARSERS[parser].parse

    def wrap(call: str) -> str:
        if parser in UNTYPED:  # a value that is no JSON is its text
            return UNTYPED[parser]("f", {"a": call[call.index('"a": ') + 5 : -2]})
        if parser == "hermes":
            return f"<tool_call>{call}</tool_call>"
        if parser == "mistral":
            return f"[TOOL_CALLS] [{call}]"
        if parser in PYTHONIC:  # the JSON number or string is a Python literal too
            return pythonic_call("f", {"a": call[call.index('"a": ') + 5 : -2]})
        value = json.loads(call.replace("9" * 5000, "9"))  # only to split name and arguments
        arguments = call[call.index('"arguments": ') + len('"arguments": ') : -1]
        if parser == "openai":
            return harmony_call(value["name"], arguments)
        if parser == "kimi_k2":
            return section(kimi_k2_call(value["name"], arguments))
        wrap_call = deepseek_v3_call if parser == "deepseek_v3" else deepseek_v31_call
        return "<｜tool▁calls▁begin｜>" + wrap_call(value["name"], arguments)

    huge = wrap('{"name": "f", "arguments": {"a": ' + "9" * 5000 + "}}")
    if parser in UNTYPED:
        assert json.loads(parse(huge, {})[1][0].arguments) == {"a": "9" * 5000}
    else:
        assert parse(huge, {}) == (huge, [])
    [call] = parse(wrap('{"name": "f", "arguments": {"a": "\\udc00 é"}}'), {})[1]
    assert call.arguments.encode() and json.loads(call.arguments) == {"a": "\udc00 é"}


@pytest.mark.parametrize("parser", sorted(UNTYPED))
@pytest.mark.parametrize("schema", [{"enum": 3}, {"anyOf": 5}, {"oneOf": True}])
def test_a_malformed_parameter_schema_types_nothing(parser: str, schema: dict[str, Any]) -> None:
    """The request's tools are not checked as JSON schemas: an `enum`, `anyOf` or `oneOf` that is
    no list types nothing (reading it made the model's call a 500)."""
    text = UNTYPED[parser]("f", {"a": "1"})
    [call] = TOOL_CALL_PARSERS[parser].parse(text, {"f": {"properties": {"a": schema}}})[1]
    assert json.loads(call.arguments) == {"a": 1}


def test_auto_mistral_requests_keep_special_tokens() -> None:
    """[TOOL_CALLS] is a special token: skipped, the parser would never see it."""
    body = {"messages": MESSAGES, "tools": [WEATHER]}
    auto = ChatCompletionRequest.model_validate(body)
    none = ChatCompletionRequest.model_validate({**body, "tool_choice": "none"})
    mistral, hermes = (
        ChatFormats(TOOL_CALL_PARSERS["mistral"]),
        ChatFormats(TOOL_CALL_PARSERS["hermes"]),
    )
    assert not sampling_params(auto, mistral).skip_special_tokens
    assert sampling_params(auto, hermes).skip_special_tokens
    assert sampling_params(none, mistral).skip_special_tokens


def test_stream_holds_back_what_may_start_a_call() -> None:
    stream, text, sent = ToolCallStream(("<tool_call>",)), "", []
    for piece in ["Let me", " check <", "tool_", 'call>{"name": "f"}', "</tool_call>"]:
        text += piece
        sent.append(stream.feed(text))
    assert sent == ["Let me", " check ", "", "", ""]
    assert stream.in_call and text[stream.sent :].startswith("<tool_call>")
    plain = ToolCallStream(("<tool_call>",))
    assert plain.feed("a < b") == "a < b" and plain.feed("a < b <t") == " "  # "<t" waits
    assert ToolCallStream(None).feed('{"city": "Oslo"}') == ""  # sent whole at the end
    spaced = ToolCallStream(("<tool_call>",))  # whitespace before a call is no content
    assert [spaced.feed(t) for t in ["\n", "\n\n<tool_call>"]] == ["", ""] and spaced.sent == 0
    texted = ToolCallStream(("<tool_call>",))
    assert [texted.feed(t) for t in [" ", " \n", " \nHi <"]] == ["", "", " \nHi "]
    kimi = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")  # either starts a call
    spellings = ToolCallStream(kimi)
    assert spellings.feed("Hi <|tool_call_s") == "Hi "  # a start of either: held
    assert spellings.feed("Hi <|tool_call_section_begin|>") == "" and spellings.in_call
    assert ToolCallStream(kimi).feed("a" + kimi[1] + "b" + kimi[0]) == "a"  # the first written


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_launcher: Callable
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("tools-server")
    flags = ["--chat-template", TEMPLATE, "--enable-auto-tool-choice", "--tool-call-parser"]
    with server_launcher(mixtral_checkpoint, folder, *flags, "hermes") as running:
        yield running


def chat(server: RunningServer, **body: Any) -> Any:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60, "temperature": 0, **body}
    return server.client.chat.completions.create(**body)


def test_a_named_tool_choice_always_gives_a_valid_call(server: RunningServer) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = chat(server, tools=[WEATHER, TIME], tool_choice=named)
    [choice] = out.choices
    assert choice.message.content is None and choice.finish_reason == "stop"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "celsius"} and arguments["city"] in ("Paris", "Oslo")
    chunks = list(chat(server, tools=[WEATHER, TIME], tool_choice=named, stream=True))
    streamed = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name, d.function.arguments) for d in streamed] == [
        (0, "get_weather", call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""


def test_required_picks_among_the_tools(server: RunningServer) -> None:
    out = chat(server, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    [choice] = out.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_required_resolves_each_tools_definitions(server: RunningServer) -> None:
    """Pydantic-made schemas keep nested models in `$defs`; "required" nests each tool's schema, so
    its definitions must be lifted to where `#/$defs/...` resolves."""
    city = {"type": "object", "properties": {"name": {"enum": ["Paris"]}}, "required": ["name"]}
    nested = {
        "type": "function",
        "function": {
            "name": "visit",
            "parameters": {
                "type": "object",
                "$defs": {"City": {**city, "additionalProperties": False}},
                "properties": {"city": {"$ref": "#/$defs/City"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    out = chat(
        server, tools=[nested], tool_choice="required", parallel_tool_calls=False, max_tokens=120
    )
    [call] = out.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": {"name": "Paris"}}


def test_auto_renders_the_tools_and_answers_in_text(server: RunningServer) -> None:
    plain = chat(server, max_tokens=4)
    auto = chat(server, tools=[WEATHER], max_tokens=4)  # "auto" is the default with tools
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the schema is in the prompt
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"
    none = chat(server, tools=[WEATHER], tool_choice="none", max_tokens=4)
    assert none.choices[0].message.content == auto.choices[0].message.content
    longer = chat(server, tools=[WEATHER], max_tokens=24)
    chunks = list(chat(server, tools=[WEATHER], max_tokens=24, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == longer.choices[0].message.content  # nothing held back is lost


def test_a_conversation_with_a_tool_result(server: RunningServer) -> None:
    call = {
        "id": "call_7",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "celsius": true}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": "-3"},
    ]
    with server.http() as http:
        rendered = http.post("/tokenize", json={"messages": messages, "tools": [WEATHER]}).json()
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": rendered["tokens"]}).json()
    # The template got the arguments as an object, and the tool's answer with its call id.
    assert '"arguments": {"city": "Oslo", "celsius": true}' in text["prompt"]
    assert "call_7: -3" in text["prompt"]
    out = chat(server, messages=messages, tools=[WEATHER], max_tokens=3)
    assert out.usage.prompt_tokens == rendered["count"]


PIECES = [  # every format's markers, and what models write around and inside them
    "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
    "<function=", "</function>", "<parameter=", "</parameter>", "[TOOL_CALLS]",
    "<minimax:tool_call>", "</minimax:tool_call>", '<invoke name="', "</invoke>",
    '<parameter name="', "'",
    "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>",
    "<|start|>", "<|channel|>", "<|message|>", "<|call|>", "<|end|>", " to=functions.f",
    "<|tool_calls_section_begin|>", "<|tool_call_section_begin|>", "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>",
    "functions.f:0", ":1",
    "```json\n", "\n```", "{", "}", '"', ">", "\n", " ", "é", "\udc00", "9" * 30,
]  # fmt: skip
CHARS = st.sampled_from(["a", "é", "\udc00", '"', "\\", "\n", "<", "/", ">", " "])
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(CHARS, max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(CHARS, max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
ARGUMENTS = st.dictionaries(st.from_regex(r"[a-z]{1,4}", fullmatch=True), VALUES, max_size=3)


def written_call(parser: str, name: str, arguments: dict) -> str:
    """A call as `parser`'s models write it; values in Python's JSON (NaN and Infinity included,
    as a model may write them)."""
    as_json = json.dumps(arguments, ensure_ascii=False)
    if parser == "hermes":
        return f'<tool_call>{{"name": "{name}", "arguments": {as_json}}}</tool_call>'
    if parser == "mistral":
        return f'[TOOL_CALLS] [{{"name": "{name}", "arguments": {as_json}}}]'
    if parser in ("deepseek_v3", "deepseek_v31"):
        call = deepseek_v3_call if parser == "deepseek_v3" else deepseek_v31_call
        return "<｜tool▁calls▁begin｜>" + call(name, as_json) + "<｜tool▁calls▁end｜>"
    if parser == "openai":
        return harmony_call(name, as_json)
    if parser == "kimi_k2":
        return section(kimi_k2_call(name, as_json))
    if parser in PYTHONIC:
        return pythonic_written(name, arguments)
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in arguments.items()}
    return UNTYPED[parser](name, values)


def strict_json(constant: str) -> float:
    raise AssertionError(f"{constant} is not JSON")


@settings(max_examples=150, deadline=None, derandomize=True)
@example("hermes", "f", {"a": float("nan")}, [], [])
@example("mistral", "f", {"a": [float("inf")]}, [], [])
@example("deepseek_v3", "f", {"a": {"b": float("-inf")}}, [], [])
@example("kimi_k2", "f", {"a": ["\udc00", float("nan")]}, [], [])
@example("glm45", "search", {"note": "\udc00", "limit": float("nan")}, [], [])
@example("minimax_m2", "search", {"a": "\n1\n", "filters": {"b": [1.5, None]}}, [], [])
@given(
    parser=st.sampled_from(sorted(TOOL_CALL_PARSERS)),
    name=st.sampled_from(["search", "f", "get_time"]),
    arguments=ARGUMENTS,
    before=st.lists(st.sampled_from(PIECES), max_size=4),
    after=st.lists(st.sampled_from(PIECES), max_size=4),
)
def test_any_call_a_model_writes_parses_to_sendable_json_or_stays_text(
    parser: str, name: str, arguments: dict, before: list[str], after: list[str]
) -> None:
    """Each format's call, with any arguments (NaN, lone surrogates, deep nesting) and any
    markers or fragments around it: the parser never raises, and every call it returns has a
    name and strict-JSON object arguments that can be sent as UTF-8. Without stray markers
    around it, a call with finite arguments is always found."""
    text = "".join(before) + written_call(parser, name, arguments) + "".join(after)
    content, calls = TOOL_CALL_PARSERS[parser].parse(text, {"search": SEARCH})
    assert content is None or isinstance(content, str)
    for call in calls:
        assert isinstance(json.loads(call.arguments, parse_constant=strict_json), dict)
        assert call.arguments.encode() and call.name.encode()
    finite = "NaN" not in json.dumps(arguments) and "Infinity" not in json.dumps(arguments)
    if not before and not after and finite:
        assert [c.name for c in calls] == [name]
