"""vLLM's chat template extensions: extra template variables, continuing the last message, and an
assistant's earlier reasoning, each reaching the template or refused with a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from server.chat_requests import ChatCompletionRequest, TokenizeRequest
from server.chat_template import ChatRenderer, TemplateOptions
from server.errors import APIError
from tests.conftest import build_tokenizer

TEMPLATE = (
    "{% if enable_thinking is defined and not enable_thinking %}<|system|>no thinking<|end|>"
    "{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.reasoning_content %}[{{ m.reasoning_content }}]{% endif %}"
    "{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    "{% if budget is defined %}{{ 1 + budget }}{% endif %}"
)
USER = {"role": "user", "content": "What is 2 + 2?"}


@pytest.fixture(scope="module")
def renderer() -> ChatRenderer:
    return ChatRenderer(build_tokenizer(), TEMPLATE)


def text(renderer: ChatRenderer, messages: list[dict[str, Any]], **options: Any) -> str:
    ids = renderer.render(messages, None, TemplateOptions(**options)).token_ids
    return renderer.tokenizer.decode(ids)


def test_template_kwargs_reach_the_template(renderer: ChatRenderer) -> None:
    plain = text(renderer, [USER])
    assert plain == "<|user|>What is 2 + 2?<|end|><|assistant|>"
    off = text(renderer, [USER], kwargs={"enable_thinking": False})
    assert off == "<|system|>no thinking<|end|>" + plain


def test_continue_final_message_leaves_it_open(renderer: ChatRenderer) -> None:
    started = {"role": "assistant", "content": "The answer is"}
    prompt = text(
        renderer, [USER, started], add_generation_prompt=False, continue_final_message=True
    )
    assert prompt == "<|user|>What is 2 + 2?<|end|><|assistant|>The answer is"


@pytest.mark.parametrize(
    ("messages", "options", "param"),
    [
        ([USER], {"kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ([USER], {"kwargs": {"messages": []}}, "chat_template_kwargs"),
        ([USER], {"kwargs": {"budget": "many"}}, "messages"),  # the template's own TypeError
        ([{**USER, "content": "hi \ud800"}], {}, "messages"),  # a lone surrogate cannot encode
        (
            [USER, {"role": "assistant", "content": "4", "reasoning_content": "\ud800"}],
            {},
            "messages",
        ),
        (
            [USER],
            {"add_generation_prompt": False, "continue_final_message": True},
            "continue_final_message",
        ),
    ],
)
def test_bad_options_are_400s_naming_the_field(
    renderer: ChatRenderer, messages: list[dict[str, Any]], options: dict[str, Any], param: str
) -> None:
    with pytest.raises(APIError) as info:
        renderer.render(messages, None, TemplateOptions(**options))
    assert info.value.status == 400 and info.value.param == param


def test_an_assistants_reasoning_reaches_the_template(renderer: ChatRenderer) -> None:
    for field in ("reasoning", "reasoning_content"):
        request = ChatCompletionRequest.model_validate(
            {"messages": [USER, {"role": "assistant", "content": "4", field: "2 and 2 make 4"}]}
        )
        messages = [m.template_dict() for m in request.messages]
        assert "<|assistant|>[2 and 2 make 4]4<|end|>" in text(renderer, messages)
        assert messages[1]["thinking"] == "2 and 2 make 4"  # gpt-oss's template's name
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turn = {"role": "assistant", "content": "Let me look.", "reasoning": "hm", "tool_calls": [call]}
    request = ChatCompletionRequest.model_validate({"messages": [USER, turn]})
    message = request.messages[1].template_dict()  # gpt-oss's template takes no both
    assert message["reasoning_content"] == "hm" and "thinking" not in message
    with pytest.raises(ValidationError, match="only assistant messages carry reasoning"):
        ChatCompletionRequest.model_validate({"messages": [{**USER, "reasoning": "hm"}]})


@pytest.mark.parametrize("model", [ChatCompletionRequest, TokenizeRequest])
def test_a_prompt_cannot_both_open_and_continue_a_message(model: type) -> None:
    body = {"messages": [USER], "continue_final_message": True}
    with pytest.raises(ValidationError, match="add_generation_prompt"):
        model.model_validate(body)
    request = model.model_validate({**body, "add_generation_prompt": False})
    assert request.template_options() == TemplateOptions(False, True, {})


THINKING = (  # Qwen3 / GLM-4.5-like: earlier answers keep an (empty) think block
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}<think></think>{% endif %}{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_the_answer_starts_after_the_conversation() -> None:
    """Whether an answer starts thinking is read from what the prompt adds after the
    conversation, not from an earlier turn's closed think block."""
    renderer = ChatRenderer(build_tokenizer(), THINKING)
    chat = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3?"}]
    options = TemplateOptions()
    prompt = renderer.render(chat, None, options).text
    assert "</think>" in prompt
    assert renderer.answer_start(chat, None, options, prompt) == "<|assistant|>"
    prefill = [*chat, {"role": "assistant", "content": "<think>Three"}]
    options = TemplateOptions(add_generation_prompt=False, continue_final_message=True)
    prompt = renderer.render(prefill, None, options).text
    start = renderer.answer_start(prefill, None, options, prompt)
    assert start == "<|assistant|><think></think><think>Three"  # the open prefill decides
