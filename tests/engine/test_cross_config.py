"""The invariant (DESIGN §4) across random combinations of the settings it covers, drawn from
fixed seeds: the other tests vary one setting at a time, a bug between two shows only here. Each
combination must give the all-resident FCFS baseline's tokens, greedy and seeded, and leave no KV
block, slot pin or linear state behind; so must aborts while experts and KV blocks are short."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from engine import LLM, AsyncLLM, EngineConfig, SamplingParams
from engine.config import ConfigError
from engine.llm_engine import LLMEngine
from tests.conftest import save_tiny_checkpoint

MAX_MODEL_LEN = 64
SHARED = [1, *range(40, 59)]  # 20 tokens two prompts share: a prefix the cache can serve
PROMPTS = [[1, 5, 9, 200, 31], SHARED + [7, 8, 9], [1, 300], SHARED + [5] * 12, [1, *range(60, 96)]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PARAMS = [
    GREEDY,
    GREEDY,
    SamplingParams(max_tokens=6, temperature=0.9, seed=7, n=2, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.0, n=2, ignore_eos=True),
    GREEDY,
]
CACHES = [
    {"expert_cache_size": 1},  # fewer slots than a layer's top-k: experts stream through
    {"expert_cache_size": 3},
    {"expert_cache_ratio": 0.25},
    {"expert_cache_ratio": 0.5},
]
DRAWS = 10  # combinations per family: a few seconds in all on one core


def draw(rng: random.Random) -> dict[str, Any]:
    """One combination of the settings the invariant covers (cache-aware routing stays off)."""
    block_size = rng.choice([2, 4, 8, 16])
    flags: dict[str, Any] = {
        **rng.choice(CACHES),
        "cache_policy": rng.choice(["lru", "lfu", "expertflow"]),
        "predictor": rng.choice(["none", "pregate"]),
        "prefetch_horizon": rng.choice(["auto", "1", "3"]),
        "resident_first": rng.random() < 0.5,
        "cpu_expert_compute": rng.random() < 0.3,
        "token_scheduler": rng.choice(["fcfs", "expertflow"]),
        "max_num_seqs": rng.choice([1, 2, 4, 8]),
        "max_defer_steps": 8,
        "max_num_batched_tokens": rng.choice([3, 7, 16, 2048]),
        "block_size": block_size,
        "enable_prefix_caching": rng.random() < 0.7,
    }
    if rng.random() < 0.5:  # KV for one full context and a little: preemptions
        per_context = -(-MAX_MODEL_LEN // block_size)
        flags["kv_cache_blocks"] = rng.randint(per_context, per_context * 2)
    return flags


def outputs(path: Path, **flags: Any) -> tuple[list[list[list[int]]], LLM]:
    llm = LLM(model=str(path), max_model_len=MAX_MODEL_LEN, **flags)
    results = llm.generate(PROMPTS, PARAMS)
    return [[c.token_ids for c in r.outputs] for r in results], llm


def assert_nothing_held(engine: LLMEngine) -> None:
    assert engine.blocks.num_used == 0, "a finished sequence kept KV blocks"
    assert not any(engine.offload.cache.pins), "a slot stayed pinned"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    states = engine.runner.states
    assert states is None or states.num_free == engine.config.max_num_seqs


@pytest.mark.parametrize("family", ["mixtral", "qwen3_next", "gpt_oss"])
def test_random_combinations_keep_outputs(family: str, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(family, tmp_path / family)
    reference, _ = outputs(path)
    rng = random.Random(family)
    for _ in range(DRAWS):
        flags = draw(rng)
        try:
            tokens, llm = outputs(path, **flags)
        except ConfigError:  # a combination refused by design
            continue
        assert tokens == reference, flags
        assert_nothing_held(llm.engine)


def test_aborts_under_offloading_and_kv_pressure_leave_nothing_held(tmp_path: Path) -> None:
    """Half the requests go mid-stream while prefetches are in flight and KV blocks are short;
    afterwards no block or slot is held, and the engine still answers as an all-resident one."""
    path = save_tiny_checkpoint("qwen3_next", tmp_path / "qwen3_next")  # linear states too
    reference, _ = outputs(path)
    config = EngineConfig(
        model=str(path),
        max_model_len=MAX_MODEL_LEN,
        expert_cache_size=3,
        predictor="pregate",
        prefetch_horizon="1",
        resident_first=True,
        link_gbps=0.5,
        kv_cache_blocks=10,
        block_size=8,
        max_num_batched_tokens=7,
    )
    engine = AsyncLLM(config)
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, n=2)

    async def leave_after(i: int, outputs_seen: int) -> None:
        stream = engine.generate(PROMPTS[i % len(PROMPTS)], long, f"gone-{i}")
        async for _ in stream:
            outputs_seen -= 1
            if outputs_seen <= 0:
                break  # the client goes: closing the stream aborts the request

    async def stay(i: int) -> list[list[int]]:
        outs = [o async for o in engine.generate(PROMPTS[i], PARAMS[i], f"stay-{i}")]
        return [c.token_ids for c in outs[-1].outputs]

    async def main() -> list[list[list[int]]]:
        aborts = [leave_after(i, 1 + i % 3) for i in range(6)]
        stays = [stay(i) for i in range(len(PROMPTS))]
        results = await asyncio.gather(*aborts, *stays)
        deadline = time.monotonic() + 20
        while engine.engine.requests or engine.stats()["kv_blocks_used"]:
            assert time.monotonic() < deadline, engine.stats()
            await asyncio.sleep(0.01)
        return results[len(aborts) :]

    try:
        kept = asyncio.run(asyncio.wait_for(main(), 60))
        assert kept == reference
        assert_nothing_held(engine.engine)
    finally:
        engine.shutdown()
