"""Request bodies refused as they are parsed, on the request models (no server): what is refused,
and that `param` names the field as the client wrote it, also where the field takes one of several
forms (pydantic names the form that refused the value in the error's location)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from server.api_requests import MAX_STOP_STRINGS, CompletionRequest
from server.chat_requests import ChatCompletionRequest
from server.errors import validation_message
from server.request_model import RequestModel

MESSAGES = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": MESSAGES, **fields}


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (ChatCompletionRequest, chat(tools=TOOLS, tool_choice="maybe"), "tool_choice"),
        (ChatCompletionRequest, chat(tools=TOOLS, tool_choice={"type": "x"}), "tool_choice"),
        (CompletionRequest, {"prompt": "a", "structured_outputs": {"json": 5}}, "structured_outputs.json"),
        (ChatCompletionRequest, chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (CompletionRequest, {"prompt": "a", "logit_bias": {"7": "x"}}, "logit_bias.7"),
    ],
)  # fmt: skip
def test_param_names_the_field(model: type[RequestModel], body: dict, param: str) -> None:
    with pytest.raises(ValidationError) as invalid:
        model.model_validate_json(json.dumps(body))
    message, named = validation_message(invalid.value.errors()[0])
    assert named == param and message.startswith(f"{param}: "), message


def test_stop_strings_are_capped() -> None:
    """Each is searched for after every token, in the engine loop all requests share: 95,000 of
    them (a 950 kB body) took a 50-token answer running beside them from 0.13 s to 16 s."""
    stops = [f"s{i}" for i in range(MAX_STOP_STRINGS)]
    assert CompletionRequest.model_validate_json(json.dumps({"prompt": "a", "stop": stops})).stop
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate_json(json.dumps(chat(stop=[*stops, "one more"])))
    message, param = validation_message(refused.value.errors()[0])
    assert param == "stop" and f"at most {MAX_STOP_STRINGS} stop strings" in message, message


def test_web_search_options_are_refused_even_empty() -> None:
    """`web_search_options: {}` is how OpenAI's API turns web search on with its defaults: an
    empty object is a request, so answering without searching would be a wrong answer, quietly."""
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate_json(json.dumps(chat(web_search_options={})))
    message, param = validation_message(refused.value.errors()[0])
    assert param == "web_search_options" and "not supported" in message, message
    assert ChatCompletionRequest.model_validate_json(json.dumps(chat(web_search_options=None)))
