"""Resident-first execution and host-computed experts keep outputs; cache-aware routing is off at
margin 0 and cuts misses above."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from engine import LLM, SamplingParams
from engine.offload.experts import OffloadedExperts

if TYPE_CHECKING:
    from tests.conftest import GreedyRun


def test_resident_first_keeps_outputs(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, greedy_run: GreedyRun
) -> None:
    calls = 0
    original = OffloadedExperts._resident_first

    def counted(self, *args):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += 1
        return original(self, *args)

    monkeypatch.setattr(OffloadedExperts, "_resident_first", counted)
    reference, _ = greedy_run(tiny_checkpoint)
    for flags in ({"link_gbps": 1.0}, {"predictor": "pregate", "cache_policy": "expertflow"}):
        tokens, _ = greedy_run(
            tiny_checkpoint, expert_cache_ratio=0.5, resident_first=True, **flags
        )
        assert tokens == reference, flags
    assert calls > 0, "the resident-first path never ran"


@pytest.mark.parametrize(
    "flags",
    [
        {"expert_cache_ratio": 0.25},
        {"expert_cache_size": 1},  # the device part streams through one slot
        {"expert_cache_ratio": 0.5, "resident_first": True, "predictor": "pregate"},
    ],
    ids=["ratio-0.25", "one-slot", "resident-first-pregate"],
)
def test_host_computed_experts_keep_outputs(
    tiny_checkpoint: Path, flags: dict[str, object], greedy_run: GreedyRun
) -> None:
    # A slow emulated link: once a copy has been timed the host is quicker, so misses run there.
    reference, _ = greedy_run(tiny_checkpoint)
    tokens, llm = greedy_run(tiny_checkpoint, cpu_expert_compute=True, link_gbps=0.02, **flags)
    assert tokens == reference
    stats, offload = llm.offload_stats(), llm.engine.offload
    assert 0 < stats["host_computes"] <= stats["misses"]
    assert stats["hits"] + stats["misses"] == sum(offload.experts.activated_per_step)
    assert all(p == 0 for p in offload.cache.pins), "a slot stayed pinned after its layer ran"


@pytest.mark.parametrize(
    "flags",
    [
        {"expert_cache_size": 1},
        {"expert_cache_ratio": 0.5, "resident_first": True, "link_gbps": 1.0},
        {"expert_cache_ratio": 0.25, "cpu_expert_compute": True, "link_gbps": 0.02},
    ],
    ids=["streamed", "resident-first", "host-computed"],
)
def test_split_layers_keep_bfloat16_logprobs_bit_for_bit(
    tiny_checkpoint: Path, flags: dict[str, object]
) -> None:
    """A layer computed in several calls sums them in float32 and rounds once, as one call does:
    in bfloat16, rounding each part would move the logits."""
    prompts = [[1, 5, 9, 200, 31], [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53], [1, 300]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)

    def logprobs(**extra: object) -> list[list[tuple[int, float]]]:
        llm = LLM(model=str(tiny_checkpoint), max_model_len=64, dtype="bfloat16", **extra)
        outs = [o.outputs[0] for o in llm.generate(prompts, params)]
        return [[(lp.token_id, lp.logprob) for lp in o.logprobs or []] for o in outs]

    assert logprobs(**flags) == logprobs()


def test_margin_zero_is_the_default_path(mixtral_checkpoint: Path, greedy_run: GreedyRun) -> None:
    default, llm_default = greedy_run(mixtral_checkpoint, expert_cache_ratio=0.25)
    zero, llm_zero = greedy_run(
        mixtral_checkpoint, expert_cache_ratio=0.25, cache_aware_routing_margin=0.0
    )
    assert zero == default
    a, b = llm_default.offload_stats(), llm_zero.offload_stats()
    assert (a["hits"], a["misses"], a["transfers"]) == (b["hits"], b["misses"], b["transfers"])
    assert llm_zero.engine.offload.experts.rerouted == 0


def test_a_wide_margin_prefers_resident_experts(
    mixtral_checkpoint: Path, greedy_run: GreedyRun
) -> None:
    _, base = greedy_run(mixtral_checkpoint, expert_cache_ratio=0.25)
    _, wide = greedy_run(
        mixtral_checkpoint, expert_cache_ratio=0.25, cache_aware_routing_margin=100.0
    )
    assert wide.engine.offload.experts.rerouted > 0
    assert wide.offload_stats()["misses"] < base.offload_stats()["misses"]


def test_rerouting_only_picks_resident_experts(mixtral_checkpoint: Path) -> None:
    llm = LLM(
        model=str(mixtral_checkpoint),
        max_model_len=64,
        expert_cache_size=4,
        cache_aware_routing_margin=1e9,
    )
    experts = llm.engine.offload.experts
    layer = llm.engine.model_config.moe_layers[0]
    resident = torch.tensor(experts.cache.resident_mask(layer, experts.num_experts))
    logits = torch.randn(6, experts.num_experts)
    topk = logits.topk(2, dim=-1).indices
    ids, weights = experts._prefer_resident(layer, topk, logits, torch.float32)
    for row in range(6):
        n_resident = int(resident.sum())
        assert int(resident[ids[row]].sum()) == min(2, n_resident)
    assert torch.allclose(weights.sum(-1), torch.ones(6))
