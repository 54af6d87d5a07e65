"""--reasoning-parser: a thinking model's reasoning split from its content, whole and streamed, with
tool calls parsed from the content after it; and a server wired to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from engine import GuidedDecoding, SamplingParams
from server.chat_answer import (
    Answer,
    ChatFormats,
    ChoiceStream,
    answer,
    grammar_after_reasoning,
)
from server.chat_requests import ChatCompletionRequest
from server.generations import ChoiceDelta
from server.reasoning import REASONING_PARSERS
from server.tool_parsers import TOOL_CALL_PARSERS

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

R1, QWEN3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
TEXTS = [
    "It is cold.</think>\n\nBring a coat.",
    "<think>It is cold.</think>Bring a coat.",
    "<think>a < b, and </thin is not the end</think>so <think> stays content",
    "no markers at all",
    "<think>cut short while thinking",
    "<thi",
    "",
    "Let me look.</think>" + CALL,
    "Hm.</think>a call may start: <tool_ca",  # held back, then text after all
    "\n<think>It is cold.</think>\nCoat.",  # GLM-4.5: a newline before its <think>
    "\n  plain, after whitespace",
]


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        (
            "deepseek_r1",
            "It is cold.</think>\n\nBring a coat.",
            ("It is cold.", "\n\nBring a coat."),
        ),
        ("deepseek_r1", "<think>It is cold.</think>Coat.", ("It is cold.", "Coat.")),
        ("deepseek_r1", "cut short", ("cut short", None)),
        ("qwen3", "<think>It is cold.</think>Coat.", ("It is cold.", "Coat.")),
        ("qwen3", "Coat, no thinking. </think>", ("", "Coat, no thinking. </think>")),
        ("qwen3", "<think>cut short", ("cut short", None)),
        ("qwen3", "<thi", ("", "<thi")),  # finished: not a marker after all
        ("glm45", "\n<think>It is cold.</think>\nCoat.", ("It is cold.", "\nCoat.")),
        ("glm45", "\n plain", ("", "\n plain")),
        ("minimax_m2", "It is cold.\n</think>\n\nCoat.", ("It is cold.\n", "\n\nCoat.")),
        ("minimax_m2", "cut short", ("cut short", None)),
    ],
)
def test_finished_text_splits(parser: str, text: str, expected: tuple) -> None:
    fmt = REASONING_PARSERS[parser]
    assert fmt.split(text, True, fmt.open_by_default) == expected


@pytest.mark.parametrize(
    ("prompt", "r1", "qwen3"),
    [
        ("<|user|>hi<|end|><|assistant|>", True, None),  # no marker: R1 thinks, Qwen3 decides
        ("<｜Assistant｜><think>\n", True, True),  # R1's template, Qwen3's thinking-only ones
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False, False),  # thinking off
        ("<｜Assistant｜></think>", False, False),  # DeepSeek-V3.1, non-thinking mode
        ("<think>old</think> ... <|assistant|><think>\nLet me", True, True),  # a prefill
    ],
)
def test_the_prompt_says_whether_the_answer_starts_thinking(
    prompt: str, r1: bool, qwen3: bool | None
) -> None:
    assert (R1.starts_open(prompt), QWEN3.starts_open(prompt)) == (r1, qwen3)


# harmony: test_harmony.py
@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3", "glm45", "minimax_m2"])
@pytest.mark.parametrize("text", TEXTS)
def test_a_streamed_split_only_grows_into_the_finished_one(parser: str, text: str) -> None:
    fmt = REASONING_PARSERS[parser]
    final_reasoning, final_content = fmt.split(text, True, fmt.open_by_default)
    for end in range(len(text)):
        reasoning, content = fmt.split(text[:end], False, fmt.open_by_default)
        assert final_reasoning.startswith(reasoning)
        if content is not None:
            assert final_content is not None and final_content.startswith(content)
        held = end - len(reasoning) - len(content or "")
        dropped = len(text) - len(text.lstrip())  # whitespace before a <think>
        assert held <= len("<think></think>") + dropped  # markers and partial markers only


def chat(
    body: dict[str, Any] | None = None, reasoning_open: bool | None = True
) -> ChatCompletionRequest:
    request = ChatCompletionRequest.model_validate({"messages": MESSAGES, **(body or {})})
    request.reasoning_open = reasoning_open  # as the server sets it from the rendered prompt
    return request


def call_id(call_id: str) -> str:
    """A written id (Kimi-K2's) as it is; a generated one (random) as its kind."""
    return "call_" if call_id.startswith("call_") else call_id


def written_calls(whole: Answer) -> list[tuple[str, str, str]]:
    calls = whole.tool_calls or ()
    return [(call_id(c.id), c.function.name, c.function.arguments) for c in calls]


def stream_whole(request: ChatCompletionRequest, formats: ChatFormats, text: str) -> dict:
    """Feed `text` a character at a time; what the chunks say, joined (calls as id, name and
    arguments, as `written_calls` gives the whole answer's)."""
    stream, joined = ChoiceStream(request, formats), {"reasoning": "", "content": "", "calls": []}
    for i, char in enumerate(text):
        last = i == len(text) - 1
        delta = ChoiceDelta(0, char, None, "stop" if last else None)
        chunk = stream.advance(delta)
        if chunk is None:
            continue
        joined["reasoning"] += chunk.delta.reasoning or ""
        joined["content"] += chunk.delta.content or ""
        calls = chunk.delta.tool_calls or ()
        joined["calls"] += [(call_id(c.id), c.function.name, c.function.arguments) for c in calls]
        joined["finish"] = chunk.finish_reason
    return joined


def assert_streams_as_whole(
    request: ChatCompletionRequest, formats: ChatFormats, text: str
) -> None:
    """Streamed a character at a time, `text` says what the finished answer says: reasoning,
    content, calls and finish reason."""
    whole = answer(request, formats, text, "stop")
    streamed = stream_whole(request, formats, text)
    assert streamed["reasoning"] == (whole.reasoning or "")
    assert streamed["content"] == (whole.content or "")
    assert streamed["calls"] == written_calls(whole)
    assert streamed["finish"] == whole.finish_reason


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_streamed_chunks_add_up_to_the_whole_answer(text: str) -> None:
    formats = ChatFormats(TOOL_CALL_PARSERS["hermes"], R1)
    assert_streams_as_whole(chat({"tools": [WEATHER]}), formats, text)


def test_calls_are_parsed_from_the_content_after_the_reasoning() -> None:
    formats = ChatFormats(TOOL_CALL_PARSERS["hermes"], R1)
    request = chat({"tools": [WEATHER]})
    result = answer(request, formats, "Oslo? " + CALL + "</think>Sunny.", "stop")
    assert result.tool_calls is None  # a call written while thinking is reasoning
    result = answer(request, formats, "Let me look.</think>" + CALL, "stop")
    assert result.reasoning == "Let me look." and result.content is None
    assert [c.function.name for c in result.tool_calls or ()] == ["get_weather"]
    assert result.finish_reason == "tool_calls"


def test_reasoning_can_be_left_out_and_grammars_start_after_it() -> None:
    formats = ChatFormats(None, R1)
    hidden = chat({"include_reasoning": False})
    result = answer(hidden, formats, "hmm</think>Coat.", "stop")
    assert (result.reasoning, result.content) == (None, "Coat.")
    assert stream_whole(hidden, formats, "hmm</think>Coat.")["reasoning"] == ""
    json_mode = {"response_format": {"type": "json_object"}}
    bound = chat(json_mode, reasoning_open=False)  # the grammar ran from the first token
    assert answer(bound, formats, '{"a": 1}', "stop").content == '{"a": 1}'
    thinking = chat(json_mode)  # the prompt opened a think block: the grammar ran after it
    result = answer(thinking, formats, 'hmm</think>{"a": 1}', "stop")
    assert (result.reasoning, result.content) == ("hmm", '{"a": 1}')
    text_format = chat({"response_format": {"type": "text"}})  # no grammar: reasoning as usual
    assert answer(text_format, formats, "hmm</think>Coat.", "stop").reasoning == "hmm"
    closed = chat(reasoning_open=False)  # the prompt closed the block: all content, calls too
    assert answer(closed, formats, "Coat.", "stop").content == "Coat."


def test_a_model_that_may_think_gets_its_grammar_after_it_or_from_the_start() -> None:
    """Qwen3 or GLM with no marker in the prompt (`reasoning_open` None): the grammar waits for
    `</think>` only if the answer opens with `<think>` (`opener`); the answer splits either way."""
    formats = ChatFormats(None, QWEN3)
    params = SamplingParams(guided=GuidedDecoding())
    decides = chat({"response_format": {"type": "json_object"}}, reasoning_open=None)
    guided = grammar_after_reasoning(params, decides, QWEN3).guided
    assert guided is not None and (guided.opener, guided.start_after) == ("<think>", "</think>")
    result = answer(decides, formats, '<think>hmm</think>{"a": 1}', "stop")
    assert (result.reasoning, result.content) == ("hmm", '{"a": 1}')
    assert answer(decides, formats, '{"a": 1}', "stop").content == '{"a": 1}'
    opened = grammar_after_reasoning(params, chat(reasoning_open=True), QWEN3).guided
    assert opened is not None and (opened.opener, opened.start_after) == (None, "</think>")
    assert grammar_after_reasoning(params, chat(reasoning_open=False), QWEN3) is params


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_launcher: Callable
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("reasoning-server")
    with server_launcher(
        mixtral_checkpoint, folder, "--reasoning-parser", "deepseek_r1"
    ) as running:
        yield running


def test_a_server_returns_the_reasoning(server: RunningServer) -> None:
    """The tiny model never writes </think>: its whole answer is reasoning, as R1's would be when
    cut short; the same prompt through /v1/completions gives the same text."""
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 12,
        "temperature": 0,
    }
    with server.http() as http:
        tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        plain = http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": tokens, "max_tokens": 12, "temperature": 0},
        ).json()["choices"][0]["text"]
        message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        hidden = http.post("/v1/chat/completions", json={**body, "include_reasoning": False})
        json_mode = {**body, "response_format": {"type": "json_object"}}
        thinking = http.post("/v1/chat/completions", json=json_mode).json()["choices"][0]
    assert message["reasoning"] == plain and message["content"] is None
    # JSON mode waits for </think>, which never comes: the thinking is as free as without it
    assert thinking["message"]["reasoning"] == plain and thinking["message"]["content"] is None
    assert "reasoning" not in hidden.json()["choices"][0]["message"]
    chunks = list(server.client.chat.completions.create(**body, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas) == plain
    assert not any(d.content for d in deltas)


def test_a_prompt_that_closed_the_block_gets_content(server: RunningServer) -> None:
    """An answer prefilled past its thinking (`continue_final_message`): the rendered prompt's last
    marker is </think>, so what the model adds is content."""
    prefilled = [*MESSAGES, {"role": "assistant", "content": "Cold.</think>"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    with server.http() as http:
        tokens = http.post("/tokenize", json={"messages": prefilled, **options}).json()["tokens"]
        plain = http.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": tokens, "max_tokens": 12, "temperature": 0},
        ).json()["choices"][0]["text"]
        body = {"model": "tiny", "messages": prefilled, "max_tokens": 12, "temperature": 0}
        message = http.post("/v1/chat/completions", json={**body, **options}).json()
    assert message["choices"][0]["message"] == {"role": "assistant", "content": plain}
