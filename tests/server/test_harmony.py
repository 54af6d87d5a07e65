"""gpt-oss's harmony format: `--reasoning-parser openai_gptoss` and `--tool-call-parser openai` on
the texts gpt-oss writes, whole and streamed, through chat answers; `reasoning_effort` to the
template; and a server wired to both (its tiny model writes no harmony, so its text is content)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import ValidationError

from engine import GuidedDecoding, SamplingParams
from server.chat_answer import ChatFormats, answer, grammar_after_reasoning
from server.chat_requests import ChatCompletionRequest
from server.cli import main
from server.harmony import harmony_calls
from server.reasoning import REASONING_PARSERS
from server.serving_chat import sampling_params
from server.tool_parsers import TOOL_CALL_PARSERS
from tests.server.test_reasoning import assert_streams_as_whole

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

HARMONY = REASONING_PARSERS["openai_gptoss"]
FORMATS = ChatFormats(TOOL_CALL_PARSERS["openai"], HARMONY)
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
ARGS = '{"city": "Oslo"}'
ANALYSIS = "<|channel|>analysis<|message|>User wants the weather. Call get_weather.<|end|>"
CALL_CHANNEL_FIRST = (
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    f"<|message|>{ARGS}<|call|>"
)
CALL_RECIPIENT_FIRST = (
    f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}"
)
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Let me look that up.<|end|>"
SPLITS = [  # text after the prompt's "<|start|>assistant" -> (reasoning, content), finished
    (
        "<|channel|>analysis<|message|>User asks: 1+1. That's 2.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>1 + 1 = **2**.",
        ("User asks: 1+1. That's 2.", "1 + 1 = **2**."),
    ),
    ("<|channel|>final<|message|>Hello! How can I help?", ("", "Hello! How can I help?")),
    (
        "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>analysis"
        "<|message|>More.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>",
        ("Hm.\nMore.", "Done."),
    ),
    (ANALYSIS + CALL_CHANNEL_FIRST, ("User wants the weather. Call get_weather.", CALL_CHANNEL_FIRST)),
    (ANALYSIS + CALL_RECIPIENT_FIRST, ("User wants the weather. Call get_weather.", CALL_RECIPIENT_FIRST)),
    (
        f" to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}",  # first message
        ("", f"<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{ARGS}"),
    ),
    (
        ANALYSIS + PREAMBLE + CALL_CHANNEL_FIRST,
        ("User wants the weather. Call get_weather.", "Let me look that up." + CALL_CHANNEL_FIRST),
    ),
    (
        "<|channel|>analysis<|message|>Run it.<|end|><|start|>assistant<|channel|>analysis "
        "to=python code<|message|>print(2)<|call|>",  # a built-in tool's call: reasoning
        ("Run it.\nprint(2)", None),
    ),
    (
        "<|channel|>commentary to=browser.search json<|message|>{}<|call|>",  # another tool's
        ("{}", None),
    ),
    (
        "<|channel|>commentary<|message|>Checking.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Sunny.",
        ("", "Checking.\nSunny."),
    ),
    ("<|channel|>analysis<|message|>cut short while thinking", ("cut short while thinking", None)),
    ("<|channel|>analys", ("", None)),  # cut short in the header
    ("A model that writes no harmony <|end|>", ("", "A model that writes no harmony <|end|>")),
    (  # an end marker written as text, inside an answer, is the answer's
        "<|channel|>final<|message|>Write <|end|> to close it.<|return|>",
        ("", "Write <|end|> to close it."),
    ),
    ("", ("", "")),
]  # fmt: skip
MARKUP = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_finished_text_splits(text: str, expected: tuple[str, str | None]) -> None:
    assert HARMONY.split(text, True, False) == expected


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_a_streamed_split_only_grows_into_the_finished_one(
    text: str, expected: tuple[str, str | None]
) -> None:
    """Every prefix, as the text streams in: each part only grows, the finished split is the
    whole text's, and reasoning never shows markup (content only in a call's own text)."""
    before: tuple[str, str | None] = ("", None)
    for end in range(len(text) + 1):
        reasoning, content = HARMONY.split(text[:end], end == len(text), False)
        assert reasoning.startswith(before[0])
        assert before[1] is None or (content is not None and content.startswith(before[1]))
        assert not any(m in reasoning for m in MARKUP)
        if not any(kept in text for kept in ("functions.", "no harmony", "close it")):
            assert not any(m in (content or "") for m in MARKUP)
        before = (reasoning, content)
    assert before == expected


def test_many_messages_split_in_linear_time() -> None:
    """16,000 messages (a model stuck in a loop): one scan, not a search per marker per message
    (9 s before)."""
    text = "<|channel|>analysis<|message|>x<|end|><|start|>assistant" * 16000
    start = time.perf_counter()
    reasoning, content = HARMONY.split(text, True, False)
    assert time.perf_counter() - start < 1.0
    assert reasoning == "\n".join(["x"] * 16000) and content is None


def test_only_what_may_become_a_marker_is_held_back() -> None:
    assert HARMONY.split("<|channel|>analysis<|message|>Two <", False, False) == ("Two ", None)
    assert HARMONY.split("<|channel|>analysis<|message|>a<|e", False, False) == ("a", None)
    assert HARMONY.split("<|channel|>final<|message|>Hi", False, False) == ("", "Hi")
    assert HARMONY.split("<|chan", False, False) == ("", None)  # may still be a header
    assert HARMONY.split(" t", False, False) == ("", None)  # may still be " to=functions..."
    assert HARMONY.split(" the", False, False) == ("", " the")


@pytest.mark.parametrize(
    ("prompt", "opened"),
    [
        ("<|start|>user<|message|>Hi<|end|><|start|>assistant", False),
        ("<|start|>assistant<|channel|>analysis<|message|>Prefilled thought", True),
        ("<|start|>assistant<|channel|>final<|message|>Prefilled answer", False),
        ("<|start|>assistant<|channel|>analysis<|message|>Done.<|end|>", False),
    ],
)
def test_the_prompt_says_whether_the_answer_starts_in_analysis(prompt: str, opened: bool) -> None:
    assert HARMONY.starts_open(prompt) is opened


def test_a_prefilled_analysis_continues_as_reasoning() -> None:
    text = "still thinking.<|end|><|start|>assistant<|channel|>final<|message|>Answer."
    assert HARMONY.split(text, True, True) == ("still thinking.", "Answer.")
    assert HARMONY.split("still thinking.<|en", False, True) == ("still thinking.", None)


@pytest.mark.parametrize("call", [CALL_CHANNEL_FIRST, CALL_RECIPIENT_FIRST])
def test_calls_are_parsed_from_either_header_order(call: str) -> None:
    content, calls = harmony_calls("Let me look that up." + call)
    assert content == "Let me look that up."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert harmony_calls(call)[0] is None
    assert harmony_calls("no calls") == ("no calls", [])


@pytest.mark.parametrize(
    "broken",
    [
        '<|start|>assistant<|channel|>commentary to=functions.f json<|message|>{"city": ',
        "<|start|>assistant<|channel|>commentary to=functions.f json<|message|>[1]<|call|>",
        "<|start|>assistant<|channel|>commentary to=functions. json<|message|>{}<|call|>",
        "<|start|>assistant<|channel|>commentary<|message|>no recipient<|end|>",
    ],
)
def test_a_call_that_does_not_parse_stays_text(broken: str) -> None:
    assert harmony_calls(broken) == (broken, [])


def chat(
    body: dict[str, Any] | None = None, prompt: str = "<|start|>assistant"
) -> ChatCompletionRequest:
    request = ChatCompletionRequest.model_validate({"messages": MESSAGES, **(body or {})})
    request.reasoning_open = HARMONY.starts_open(prompt)  # as the server sets it
    return request


@pytest.mark.parametrize("call", [CALL_CHANNEL_FIRST, CALL_RECIPIENT_FIRST])
def test_an_answer_with_a_call(call: str) -> None:
    request = chat({"tools": [WEATHER]})
    result = answer(request, FORMATS, ANALYSIS + PREAMBLE + call, "stop")
    assert result.reasoning == "User wants the weather. Call get_weather."
    assert result.content == "Let me look that up." and result.finish_reason == "tool_calls"
    [tool_call] = result.tool_calls or []
    assert (tool_call.function.name, tool_call.function.arguments) == ("get_weather", ARGS)
    unparsed = answer(
        chat({"tools": [WEATHER], "tool_choice": "none"}), FORMATS, ANALYSIS + call, "stop"
    )
    assert (unparsed.content, unparsed.tool_calls, unparsed.finish_reason) == (call, None, "stop")


@pytest.mark.parametrize("text", [text for text, _ in SPLITS if text])
def test_streamed_chunks_add_up_to_the_whole_answer(text: str) -> None:
    assert_streams_as_whole(chat({"tools": [WEATHER]}), FORMATS, text)


def test_harmony_keeps_special_tokens_and_grammars_follow_the_final_message() -> None:
    plain = chat()
    assert not sampling_params(plain, ChatFormats(None, HARMONY)).skip_special_tokens
    assert sampling_params(plain, ChatFormats()).skip_special_tokens
    params = SamplingParams(guided=GuidedDecoding())
    json_mode = {"response_format": {"type": "json_object"}}
    assert grammar_after_reasoning(params, chat(json_mode), HARMONY) is params  # from token one
    assert answer(chat(json_mode), FORMATS, '{"a": 1}', "stop").content == '{"a": 1}'
    prefilled = chat(json_mode, "<|start|>assistant<|channel|>analysis<|message|>Hm")
    guided = grammar_after_reasoning(params, prefilled, HARMONY).guided
    assert guided is not None and guided.opener is None
    assert guided.start_after == "<|channel|>final<|message|>"


def test_reasoning_effort_reaches_the_template_unless_the_kwargs_set_it() -> None:
    assert chat({"reasoning_effort": "high"}).template_options().kwargs == {
        "reasoning_effort": "high"
    }
    assert "reasoning_effort" not in chat().template_options().kwargs
    kwargs = {
        "chat_template_kwargs": {"reasoning_effort": "low", "x": 1},
        "reasoning_effort": "high",
    }
    assert chat(kwargs).template_options().kwargs == {"reasoning_effort": "low", "x": 1}
    with pytest.raises(ValidationError, match="reasoning_effort"):
        chat({"reasoning_effort": "minimal"})


LONG = "set by chat_template_kwargs, which win " * 4
TEMPLATE = (
    "{% if reasoning_effort is defined %}<|system|>Reasoning: {{ reasoning_effort }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>"
)


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_launcher: Callable
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("harmony-server")
    flags = ["--chat-template", TEMPLATE, "--reasoning-parser", "openai_gptoss"]
    flags += ["--enable-auto-tool-choice", "--tool-call-parser", "openai"]
    with server_launcher(mixtral_checkpoint, folder, *flags) as running:
        yield running


def test_a_server_keeps_special_tokens(server: RunningServer) -> None:
    """The tiny model writes no harmony, so its answer is content; pushed to write a special token
    (`<|end|>`), the token stays in the text, whole and streamed, as /v1/completions gives it with
    `skip_special_tokens: false`."""
    with server.http() as http:
        [end] = http.post("/tokenize", json={"prompt": "<|end|>"}).json()["tokens"]
        tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        shared = {"model": "tiny", "max_tokens": 6, "temperature": 0, "logit_bias": {end: 100}}
        raw = {**shared, "prompt": tokens, "skip_special_tokens": False}
        plain = http.post("/v1/completions", json=raw).json()["choices"][0]["text"]
        body = {**shared, "messages": MESSAGES}  # no tools: the reasoning parser keeps them
        message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert plain == "<|end|>" * 6
    assert message == {"role": "assistant", "content": plain}
    chunks = list(server.client.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain


def test_a_server_passes_the_reasoning_effort_to_the_template(server: RunningServer) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1}
    efforts: list[dict[str, Any]] = [
        {},
        {"reasoning_effort": "high"},
        {"reasoning_effort": "high", "chat_template_kwargs": {"reasoning_effort": LONG}},
    ]
    with server.http() as http:
        answers = [http.post("/v1/chat/completions", json={**body, **e}) for e in efforts]
        bad = http.post("/v1/chat/completions", json={**body, "reasoning_effort": "minimal"})
    none, high, kwargs = (a.json()["usage"]["prompt_tokens"] for a in answers)
    assert none < high < kwargs
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"


def test_the_openai_tool_parser_needs_the_harmony_split(
    mixtral_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "openai", "--log-level", "error"]
    assert main(["serve", "--model", str(mixtral_checkpoint), *flags]) == 2
    assert "--reasoning-parser openai_gptoss" in caplog.text
