"""A refused body's `param` names the field as the client wrote it, also where the field takes one
of several forms: pydantic names the form that refused the value in the error's location."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from server.api_requests import CompletionRequest
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
