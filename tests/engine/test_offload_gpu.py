"""The offloading invariants on CUDA with real copy streams (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
PROMPTS = [
    [1, 5, 9, 200, 31],
    [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53],
    [1, 300],
    [1, 12, 13, 14],
]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def greedy(path: Path, **flags: object) -> tuple[list[list[int]], dict[str, float]]:
    llm = LLM(model=str(path), device="cuda", max_model_len=64, **flags)
    outs = llm.generate(PROMPTS, PARAMS)
    return [o.token_ids for o in outs], llm.offload_stats()


@pytest.mark.parametrize(
    "flags",
    [
        {"expert_cache_size": 1},
        {"expert_cache_ratio": 0.25},
        {"expert_cache_ratio": 0.5, "cache_policy": "lfu"},
        {
            "expert_cache_ratio": 0.5,
            "predictor": "pregate",
            "cache_policy": "expertflow",
            "resident_first": True,
        },
    ],
)
def test_cuda_outputs_do_not_depend_on_the_cache(
    tiny_checkpoint: Path, flags: dict[str, object]
) -> None:
    reference, full = greedy(tiny_checkpoint, expert_cache_ratio=1.0)
    assert full["misses"] == 0 and full["transfers"] == 0
    tokens, stats = greedy(tiny_checkpoint, **flags)
    assert tokens == reference
    assert stats["misses"] > 0
    assert stats["hits"] + stats["misses"] > 0
    assert stats["stall_seconds"] >= 0.0
