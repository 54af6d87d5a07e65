"""Sampling settings at the edges of their ranges answer like any others: the engine samples a whole
step at once, so one request whose settings break the draw would fail every request beside it.
In-process, over the real engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from engine import EngineConfig
from server.app import ServerSettings, build_app

EDGES = [
    {"top_p": 1e-300},  # rounds to 0 in float32: the nucleus kept no token
    {"repetition_penalty": 1e-300},  # rounds to 0: a seen token's logit divided by it is inf
    {"repetition_penalty": 1e-36, "temperature": 1e-5},  # finite, until the temperature scales it
]


async def answers(checkpoint: Path, bodies: list[dict]) -> tuple[list[httpx.Response], dict]:
    """The bodies sent together to /v1/completions, so that the engine steps them together; and
    the engine's stats after them."""
    app = build_app(EngineConfig(model=str(checkpoint), max_model_len=64), ServerSettings("tiny"))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),  # loads the engine, and shuts it down after
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client,
    ):
        posts = (client.post("/v1/completions", json=body) for body in bodies)
        responses = await asyncio.gather(*posts)
        return responses, app.state.engine.stats()


@pytest.mark.parametrize("edge", EDGES)
def test_an_edge_setting_fails_neither_its_request_nor_the_others(
    mixtral_checkpoint: Path, edge: dict
) -> None:
    common = {"max_tokens": 4, "ignore_eos": True}
    bodies = [
        {"prompt": "a b a b", **common, **edge},
        {"prompt": "hello there", **common, "temperature": 0.7},
        {"prompt": [5, 6, 7], **common, "top_p": 0.9},
    ]
    responses, stats = asyncio.run(answers(mixtral_checkpoint, bodies))
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in responses)
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
