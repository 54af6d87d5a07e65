"""Sizing the expert cache to the GPU's memory (engine/memory.py), with a stand-in probe on the CPU:
the profile steps run for real on every family, the arithmetic is checked to the slot, and the
outputs stay those of an all-resident cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

import engine.llm_engine as llm_engine
from engine import LLM, SamplingParams, kv_cache
from engine.config import ConfigError, EngineConfig
from engine.kv_cache import num_kv_blocks
from engine.memory import CudaMemory, MemoryProbe, SlotStandIn, memory_probe, unsized
from engine.model_config import ModelConfig
from engine.offload.cache import ExpertCache
from engine.settle import settled
from tests.allocations import (
    AllocationEventsMissing,
    PeakProbe,
    cpu_peak,
    measured_steps,
    step_peaks,
)
from tests.conftest import save_tiny_checkpoint

if TYPE_CHECKING:
    from tests.conftest import GreedyRun

MiB = 1 << 20


class FakeProbe:
    """A GPU of `total` bytes with `held` in use besides the provisional pool, whose profile
    steps peak at `activations` bytes."""

    def __init__(self, total: int, held: int, pool: int, activations: int) -> None:
        self.total, self.used, self.activations = total, held + pool, activations
        self.profiled = 0

    def peak_during(self, run: Callable[[], None]) -> int:
        run()
        self.profiled += 1
        return self.activations

    def used_and_total(self) -> tuple[int, int]:
        return self.used, self.total


def install(monkeypatch: pytest.MonkeyPatch, probe: MemoryProbe) -> None:
    """The engine reads `probe` wherever it would read a GPU (no cache size given)."""

    def fake(config: EngineConfig) -> MemoryProbe | None:
        return probe if unsized(config) else None

    monkeypatch.setattr(llm_engine, "memory_probe", fake)


def slot_bytes(checkpoint: Path) -> tuple[int, int, int]:
    """One slot's bytes, the experts of one layer and of all layers."""
    engine = LLM(model=str(checkpoint), max_model_len=64, expert_cache_size=1).engine
    store = engine.offload.store
    return engine.offload.cache.slots.nbytes, store.num_experts, store.num_total_experts


def test_only_an_unsized_cuda_cache_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(memory_probe(EngineConfig(device="cuda")), CudaMemory)
    assert memory_probe(EngineConfig(device="cuda", expert_cache_ratio=1.0)) is None
    assert memory_probe(EngineConfig(device="cuda", expert_cache_size=8)) is None
    assert memory_probe(EngineConfig(device="cpu")) is None


def test_cuda_memory_reads_the_peak_above_the_start_and_frees_the_cache_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    allocated = {"now": 100, "peak": 500}  # an earlier peak, to be forgotten
    fakes = {
        "synchronize": lambda device=None: calls.append("sync"),
        "reset_peak_memory_stats": lambda device=None: allocated.update(peak=allocated["now"]),
        "memory_allocated": lambda device=None: allocated["now"],
        "max_memory_allocated": lambda device=None: allocated["peak"],
        "empty_cache": lambda: calls.append("empty_cache"),
        "mem_get_info": lambda device=None: calls.append("mem_get_info") or (300, 1000),
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    probe = CudaMemory(torch.device("cuda"))

    def step() -> None:
        allocated["peak"] = 170  # the step's own peak, freed by its end

    assert probe.peak_during(step) == 70
    assert probe.used_and_total() == (700, 1000)
    assert calls[-2:] == ["empty_cache", "mem_get_info"]


def test_the_cpu_keeps_every_expert_without_a_probe() -> None:
    assert memory_probe(EngineConfig()) is None
    engine = LLM(max_model_len=64).engine
    assert engine.offload.cache.num_slots == engine.offload.store.num_total_experts


def test_the_slots_take_what_the_budget_leaves(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, greedy_run: GreedyRun
) -> None:
    per_slot, per_layer, total_experts = slot_bytes(tiny_checkpoint)
    wanted = total_experts // 2 + 1
    held, activations = 37 * MiB, 5 * MiB
    total = int((held + activations + wanted * per_slot + per_slot // 2) / 0.9)
    probe = FakeProbe(total, held, per_layer * per_slot, activations)
    install(monkeypatch, probe)
    tokens, llm = greedy_run(tiny_checkpoint)
    engine = llm.engine
    assert probe.profiled == 1
    assert engine.offload.cache.num_slots == wanted == engine.config.expert_cache_size
    assert engine.blocks.num_used == 0  # the profile's blocks and states went back
    states = engine.runner.states
    assert states is None or states.num_free == engine.config.max_num_seqs
    reference, _ = greedy_run(tiny_checkpoint, expert_cache_ratio=1.0)
    assert tokens == reference


def test_statistics_start_after_the_profile(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The profile steps' misses on the provisional pool are not the server's."""
    per_slot, per_layer, total_experts = slot_bytes(mixtral_checkpoint)
    probe = FakeProbe(10 * total_experts * per_slot, 0, per_layer * per_slot, 0)
    install(monkeypatch, probe)
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=64, link_gbps=100.0)
    stats = llm.offload_stats()
    assert stats["expert_cache_slots"] == total_experts  # all fit
    assert stats["misses"] == stats["transfers"] == stats["hits"] == 0
    assert stats["stall_seconds"] == 0.0


def test_a_budget_without_room_for_one_slot_is_refused(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_slot, per_layer, _ = slot_bytes(mixtral_checkpoint)
    held = 100 * MiB
    install(monkeypatch, FakeProbe(int(held / 0.9), held, per_layer * per_slot, 4 * MiB))
    with pytest.raises(ConfigError, match="no expert slot fits"):
        LLM(model=str(mixtral_checkpoint), max_model_len=64)


def test_slots_that_do_not_fit_name_the_flags(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(self: ExpertCache, *args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ExpertCache, "__init__", out_of_memory)
    with pytest.raises(ConfigError, match="do not fit in GPU memory.*--expert-cache-ratio"):
        LLM(model=str(mixtral_checkpoint), max_model_len=64, expert_cache_ratio=0.5)


def measured(run: Callable[[], object]) -> int:
    try:
        return cpu_peak(run)
    except AllocationEventsMissing as exc:
        pytest.skip(str(exc))


def test_the_cpu_measure_counts_what_is_alive_together() -> None:
    held = torch.empty(1 << 20)  # allocated before: not counted, nor its release

    def run() -> None:
        nonlocal held
        first, second = torch.empty(1 << 18), torch.empty(1 << 19)  # 1 MiB, 2 MiB
        del first, second, held
        torch.empty(1 << 19)

    assert measured(run) == 3 << 20


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "qwen3_next"])
@pytest.mark.parametrize(
    "flags",
    [
        {"max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 128},
        {"max_model_len": 64, "max_num_seqs": 8, "max_num_batched_tokens": 128},  # > a context
        {"max_model_len": 96, "max_num_seqs": 24, "block_size": 1, "kv_cache_blocks": 120},
        {
            "max_model_len": 128,
            "max_num_seqs": 16,
            "max_num_batched_tokens": 512,
            "kv_cache_blocks": 10,
        },
    ],
    ids=["budget-short-of-context", "budget-past-context", "block-size-1", "tight-kv"],
)
def test_the_profile_peaks_above_every_real_step(
    family: str, flags: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts long, short and of one token, chunked, beside decodes with long contexts, n > 1,
    sampled with logprobs and some prompt logprobs: no step allocates more than the profile
    steps measured (plain, local windows with sinks, latent attention, linear attention)."""
    checkpoint = save_tiny_checkpoint(family, tmp_path)
    probe = PeakProbe(measured, 1 << 40)
    install(monkeypatch, probe)
    llm = LLM(model=str(checkpoint), **flags)
    peaks = step_peaks(llm, measured, seed=0)
    assert probe.activations > 0 and len(peaks) > 10
    assert max(peaks) <= probe.activations


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("path", ["streaming", "resident-first"])
def test_the_stand_in_peaks_above_the_split_expert_paths(
    mixtral_checkpoint: Path, dtype: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer streamed through a pool smaller than its experts, or computed resident experts
    first while the rest copy in, adds its experts up in float32 over several calls: the
    profile's stand-in allocates that much for the same tokens, small tables of [T, k] aside."""
    streaming = path == "streaming"
    llm = LLM(
        model=str(mixtral_checkpoint),
        max_model_len=64,
        expert_cache_size=2 if streaming else 6,
        resident_first=not streaming,
        link_gbps=None if streaming else 0.05,
        dtype=dtype,
    )
    offload, gating = llm.engine.offload, llm.engine.model.cfg.gating
    experts, layer = offload.experts, offload.store.layers[0]
    split = []
    for name in ("_stream", "_resident_first"):
        monkeypatch.setattr(experts, name, spy(getattr(experts, name), split, name))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(96, llm.engine.model_config.hidden_size, generator=generator)
    hidden = hidden.to(getattr(torch, dtype))  # [T, H]
    logits = torch.randn(96, offload.store.num_experts, generator=generator)  # [T, E]
    if not streaming:  # four of the six experts used resident, two still to copy
        warm = torch.arange(4).repeat(96, 1)  # [T, 4]
        experts(layer, hidden, warm[:, :2], logits[:, :2], logits)
        experts(layer, hidden, warm[:, 2:], logits[:, :2], logits)
        logits[:, 6:] = -torch.inf
    weights, topk_ids = logits.softmax(-1).topk(2)  # [T, k] each
    split.clear()
    real = measured(lambda: experts(layer, hidden, topk_ids, weights, logits))
    assert split == ["_stream" if streaming else "_resident_first"]
    stand_in = SlotStandIn(offload.cache, gating)
    bookkeeping = topk_ids.numel() * 8  # an index of [T, k]: the paths' small tables may differ
    assert (
        real <= measured(lambda: stand_in(layer, hidden, topk_ids, weights, logits)) + bookkeeping
    )


def spy(method: Callable[..., None], calls: list[str], name: str) -> Callable[..., None]:
    def called(*args: object) -> None:
        calls.append(name)
        method(*args)

    return called


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_a_prompt_arriving_beside_decodes_stays_within_the_profile(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shape that outgrew an earlier profile on a tight KV cache: a long prompt's first chunk
    and a one-token prompt join a running decode."""
    probe = PeakProbe(measured, 1 << 40)
    install(monkeypatch, probe)
    llm = LLM(
        model=str(save_tiny_checkpoint(family, tmp_path)),
        max_model_len=128,
        max_num_seqs=16,
        max_num_batched_tokens=512,
        kv_cache_blocks=10,
    )
    engine, params = llm.engine, SamplingParams(max_tokens=2, ignore_eos=True)
    with measured_steps(llm, measured) as peaks:
        engine.add_request("running", list(range(1, 15)), params)
        engine.step()
        engine.add_request("long", list(range(1, 127)), params)
        engine.add_request("one", [7], params)
        while engine.has_unfinished():
            engine.step()
    assert max(peaks) <= probe.activations


@pytest.mark.parametrize(
    "flags",
    [
        {"kv_cache_blocks": 4},  # one context's blocks, nothing more
        {"kv_cache_blocks": 5, "max_num_seqs": 4},
        {"block_size": 1, "max_num_seqs": 3},
        {"max_num_batched_tokens": 16},  # chunks shorter than a context
        {"max_num_seqs": 1},
        {"max_num_seqs": 3, "max_num_batched_tokens": 7, "block_size": 2},  # windows block by block
        {"max_num_seqs": 3, "max_num_batched_tokens": 7, "block_size": 1},
        {"max_model_len": 512, "max_num_seqs": 2, "max_num_batched_tokens": 16},
    ],
)
def test_the_profile_fits_any_kv_cache_that_holds_a_context(
    tiny_checkpoint: Path, flags: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch, FakeProbe(1 << 40, 0, 0, 0))
    llm = LLM(model=str(tiny_checkpoint), **{"max_model_len": 64, **flags})
    outputs = llm.generate([[1, *range(2, 60)], [1, 7]], SamplingParams(max_tokens=4))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]
    assert llm.engine.blocks.num_used == 0


def test_a_context_past_the_default_kv_budget(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU refuses it, naming the flags; CUDA takes one context's blocks, its memory checked
    as the expert cache is sized (or, with a size given, as the blocks are allocated)."""
    monkeypatch.setattr(kv_cache, "DEFAULT_KV_BYTES", 1 << 10)
    with pytest.raises(ConfigError, match="lower --max-model-len or set --kv-cache-blocks"):
        LLM(model=str(mixtral_checkpoint), max_model_len=64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mc = ModelConfig.from_pretrained(str(mixtral_checkpoint))
    cfg = settled(mc, EngineConfig(model=str(mixtral_checkpoint), device="cuda"))
    assert num_kv_blocks(mc, cfg, 64) == 64 // cfg.block_size


def test_a_kv_cache_that_does_not_fit_names_the_flags(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kv_cache.KVCache, "allocate", out_of_memory)
    with pytest.raises(ConfigError, match="KV cache .* does not fit.*--max-model-len"):
        LLM(model=str(mixtral_checkpoint), max_model_len=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serves_within_the_allowed_share(tiny_checkpoint: Path, greedy_run: GreedyRun) -> None:
    reference, _ = greedy_run(tiny_checkpoint, device="cuda", expert_cache_ratio=1.0)
    torch.cuda.reset_peak_memory_stats()
    tokens, llm = greedy_run(tiny_checkpoint, device="cuda", gpu_memory_utilization=0.5)
    assert tokens == reference
    assert torch.cuda.max_memory_reserved() <= 0.5 * torch.cuda.mem_get_info()[1]


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_utilization_is_a_fraction(value: float) -> None:
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=value)
