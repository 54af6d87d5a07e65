"""Prompts are prepared off the event loop: a long prompt's tokenizing (0.7 s for 1 MiB) or chat
template on the loop stalled every stream and every other request. In-process, over the real
engine: the tokenizer and the template record the thread that runs them."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import EngineConfig
from server.app import ServerSettings, build_app

CALLS = [
    ("/v1/completions", {"prompt": "hello there", "max_tokens": 2}),
    ("/v1/completions", {"prompt": ["one", "two"], "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "hello there"}),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
]


async def threads_used(checkpoint: Path, path: str, body: dict) -> tuple[int, set[str]]:
    app = build_app(EngineConfig(model=str(checkpoint), max_model_len=64), ServerSettings("tiny"))
    seen: set[str] = set()
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client,
    ):
        tokenizer = app.state.engine.tokenizer
        encode, template = tokenizer.encode, tokenizer.apply_chat_template

        def recorded(fn: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                seen.add(threading.current_thread().name)
                return fn(*args, **kwargs)

            return run

        tokenizer.encode, tokenizer.apply_chat_template = recorded(encode), recorded(template)
        try:
            response = await client.post(path, json=body)
        finally:
            tokenizer.encode, tokenizer.apply_chat_template = encode, template
    return response.status_code, seen


@pytest.mark.parametrize(("path", "body"), CALLS)
def test_prompts_are_prepared_on_the_prompt_worker(
    mixtral_checkpoint: Path, path: str, body: dict
) -> None:
    status, seen = asyncio.run(threads_used(mixtral_checkpoint, path, body))
    assert status == 200
    assert seen and all(name.startswith("expertflow-prompts") for name in seen), seen
