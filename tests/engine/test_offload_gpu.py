"""The offloading invariants on CUDA with real copy streams (skipped without a GPU)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from tests.conftest import GreedyRun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


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
        {"expert_cache_ratio": 0.25, "cpu_expert_compute": True},  # misses may run on the host
    ],
)
def test_cuda_outputs_do_not_depend_on_the_cache(
    tiny_checkpoint: Path, flags: dict[str, object], greedy_run: GreedyRun
) -> None:
    reference, full = greedy_run(tiny_checkpoint, device="cuda", expert_cache_ratio=1.0)
    assert full.offload_stats()["misses"] == 0 and full.offload_stats()["transfers"] == 0
    tokens, llm = greedy_run(tiny_checkpoint, device="cuda", **flags)
    stats = llm.offload_stats()
    assert tokens == reference
    assert stats["misses"] > 0
    assert stats["hits"] + stats["misses"] > 0
    assert stats["stall_seconds"] >= 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_fp8_experts_dequantized_on_the_copy_stream(tmp_path: Path, dtype: str) -> None:
    """FP8 experts cross to the GPU as FP8 (pinned, non-blocking) and are dequantized on the copy
    stream: outputs equal the dequantized checkpoint's, prefetching included."""
    from engine import LLM, SamplingParams
    from tests.conftest import save_tiny_checkpoint
    from tests.engine.test_fp8 import PROMPTS, fp8_and_reference

    fp8, reference = fp8_and_reference(
        save_tiny_checkpoint("qwen3_moe", tmp_path / "src"), tmp_path
    )
    flags = {"expert_cache_ratio": 0.5, "predictor": "pregate", "cache_policy": "expertflow"}
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = [
        LLM(model=str(p), device="cuda", dtype=dtype, max_model_len=64, **flags).generate(
            PROMPTS, params
        )
        for p in (fp8, reference)
    ]
    for a, b in zip(*outs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [e.logprob for e in a.outputs[0].logprobs] == [
            e.logprob for e in b.outputs[0].logprobs
        ]


def test_a_layers_small_host_lists_reach_the_gpu_without_a_sync() -> None:
    """`to_device` queues its copy behind the stream's work instead of waiting for that work
    (`torch.tensor(values, device="cuda")` waits: a sync, a few a MoE layer)."""
    from engine.offload.experts import to_device

    device = torch.device("cuda")
    to_device([0], device)  # the first pinned allocation is slow
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # about half a second of GPU work queued on the stream
    start = time.perf_counter()
    table = to_device(list(range(8)), device)
    mask = to_device([True, False], device, torch.bool)
    queued = time.perf_counter() - start
    assert table.tolist() == list(range(8)) and mask.tolist() == [True, False]
    assert queued < 0.1
