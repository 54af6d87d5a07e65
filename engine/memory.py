"""Sizes the expert cache to the GPU (`--gpu-memory-utilization`, vLLM's flag and meaning).

With neither --expert-cache-ratio nor --expert-cache-size, the engine starts on a provisional pool
of one layer's worth of slots, runs the largest steps its scheduler can form and measures their
activations at the peak, as vLLM's profile run does. The slots then take what the allowed share of
the GPU leaves after the weights, the KV cache, the linear-attention states, those activations and
whatever else holds device memory (the CUDA context, other processes). The CPU has no such budget:
its experts all stay resident unless a size is given."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from engine.config import ConfigError, EngineConfig
from engine.runner import Observers

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
GiB = 1 << 30


class MemoryProbe(Protocol):
    def peak_during(self, run: Callable[[], None]) -> int:
        """Bytes `run` allocated at its peak, above what was allocated before it."""
        ...

    def used_and_total(self) -> tuple[int, int]:
        """Device bytes in use now, by anyone, and the device's total."""
        ...


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def peak_during(self, run: Callable[[], None]) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - before

    def used_and_total(self) -> tuple[int, int]:
        torch.cuda.empty_cache()  # what the profile cached is free again
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free, total


def memory_probe(config: EngineConfig) -> MemoryProbe | None:
    """How the engine reads its device's memory, when the cache is to be sized to it: on CUDA,
    with no cache size given."""
    sized = config.expert_cache_ratio is not None or config.expert_cache_size is not None
    return (
        CudaMemory(torch.device(config.device)) if config.device == "cuda" and not sized else None
    )


def provisional(config: EngineConfig, experts_per_layer: int) -> EngineConfig:
    """The config the offload runtime starts from before `fit_expert_cache`: one layer's slots."""
    return dataclasses.replace(config, expert_cache_size=experts_per_layer)


def fit_expert_cache(engine: LLMEngine, probe: MemoryProbe) -> EngineConfig:
    """Resize the engine's provisional expert cache to what the GPU has room for; returns the
    engine's config with that size."""
    offload, config = engine.offload, engine.config
    activations = probe.peak_during(lambda: profile_steps(engine))
    used, total = probe.used_and_total()
    pool = offload.cache.resident_bytes  # the provisional pool, freed by the resize
    per_slot = pool // offload.cache.num_slots
    allowed = int(config.gpu_memory_utilization * total)
    room = allowed - (used - pool) - activations
    slots = min(room // per_slot, offload.store.num_total_experts)
    if slots < 1:
        raise ConfigError(
            f"gpu_memory_utilization={config.gpu_memory_utilization} allows {allowed / GiB:.2f} "
            f"GiB of the GPU's {total / GiB:.2f} GiB, but the weights, KV cache and other memory "
            f"take {(used - pool) / GiB:.2f} GiB and a step's activations {activations / GiB:.2f} "
            "GiB: no expert slot fits. Raise --gpu-memory-utilization, or lower --kv-cache-blocks, "
            "--max-num-seqs, --max-num-batched-tokens or --max-model-len"
        )
    offload.resize(slots)
    logger.info(
        "expert cache sized to --gpu-memory-utilization=%.2f of %.1f GiB: %d of %d experts "
        "(%.2f GiB of slots); %.2f GiB held before them, %.0f MiB of activations measured",
        config.gpu_memory_utilization,
        total / GiB,
        slots,
        offload.store.num_total_experts,
        slots * per_slot / GiB,
        (used - pool) / GiB,
        activations / 2**20,
    )
    return dataclasses.replace(config, expert_cache_size=slots)


@torch.inference_mode()
def profile_steps(engine: LLMEngine) -> None:
    """The largest steps the scheduler can form, on borrowed KV blocks: the last prefill chunk of
    the longest prompt the KV cache holds (max_num_batched_tokens tokens over the context before
    them), and a decode of every seat with one at that length, the others padded to it."""
    block_size, capacity = engine.config.block_size, engine.blocks.num_blocks
    seats = max(1, min(engine.config.max_num_seqs or 1, capacity // 2))
    longest = min(engine.max_model_len, (capacity - seats + 1) * block_size)
    chunk = min(engine.config.max_num_batched_tokens, longest)
    _profile_step(engine, [longest - chunk], [chunk])
    others = min(block_size, 2)  # a cached token each, so they join the padded decode group
    _profile_step(engine, [longest - 1] + [others - 1] * (seats - 1), [1] * seats)


def _profile_step(engine: LLMEngine, starts: list[int], lengths: list[int]) -> None:
    """One forward of sequences at `starts` with `lengths` new tokens each, and their sampling
    logits, on KV blocks and linear-attention states the engine holds already (so they do not
    count as activations), handed back after."""
    seq_ids = [-1 - i for i in range(len(starts))]  # negative: never a scheduler's sequence id
    device, vocab = engine.device, engine.model_config.vocab_size
    try:
        for seq_id, start, n in zip(seq_ids, starts, lengths, strict=True):
            if not engine.blocks.grow(seq_id, start + n):
                raise ConfigError("the KV cache cannot hold the memory profile's sequences")
        tables, local_tables = engine.block_tables(seq_ids)
        batch = engine.runner.prefill_batch(lengths, tables, local_tables, starts, seq_ids)
        positions = [p for a, n in zip(starts, lengths, strict=True) for p in range(a, a + n)]
        ids = torch.tensor(positions, device=device) % vocab  # [T] any ids will do
        hidden = engine.model(
            ids,
            torch.tensor(positions, device=device),
            batch,
            engine.offload.experts,
            Observers([]),
        )
        last = torch.tensor(lengths, device=device).cumsum(0) - 1  # [B]
        logits = engine.model.logits(hidden[last])  # [B, V]
        logits.float().softmax(-1).sort(-1, descending=True)  # the sampler's working copies
    finally:
        for seq_id in seq_ids:
            engine.blocks.free(seq_id)
            engine.runner.release_state(seq_id)
