"""Sizes the expert cache to the GPU (`--gpu-memory-utilization`, vLLM's flag and meaning).

With neither --expert-cache-ratio nor --expert-cache-size, the engine starts on a provisional pool
of one layer's worth of slots, runs the largest steps its scheduler can form and measures their
activations at the peak, as vLLM's profile run does. The slots then take what the allowed share of
the GPU leaves after the weights, the KV cache, the linear-attention states, those activations and
whatever else holds device memory (the CUDA context, other processes). The CPU has no such budget:
its experts all stay resident unless a size is given.

The profile runs each layer's experts in one kernel call over resident slots, without copying any
(the values go unread), adding them up in float32 as the split paths do (--resident-first,
--cpu-expert-compute, streaming when a layer's experts outnumber the slots). Not counted: the
predictor's work and prefetch staging."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from engine.config import ConfigError, EngineConfig
from engine.offload.cache import ExpertCache
from engine.runner import PROMPT_SCORE_ROWS
from engine.sampler import scored
from engine.sampling import MAX_LOGPROBS
from kernels.gating import Gating
from scheduler.block_pools import WindowedBlocks
from scheduler.blocks import BlockAllocator

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


def unsized(config: EngineConfig) -> bool:
    """Whether neither --expert-cache-ratio nor --expert-cache-size was given."""
    return config.expert_cache_ratio is None and config.expert_cache_size is None


def memory_probe(config: EngineConfig) -> MemoryProbe | None:
    """How the engine reads its device's memory, when the cache is to be sized to it: on CUDA,
    with no cache size given."""
    cuda = config.device == "cuda"
    return CudaMemory(torch.device(config.device)) if cuda and unsized(config) else None


def provisional(config: EngineConfig, experts_per_layer: int) -> EngineConfig:
    """The config the offload runtime starts from before `fit_expert_cache`: one layer's slots."""
    return dataclasses.replace(config, expert_cache_size=experts_per_layer)


def fit_expert_cache(engine: LLMEngine, probe: MemoryProbe) -> EngineConfig:
    """Resize the engine's provisional expert cache to what the GPU has room for; returns the
    engine's config with that size."""
    offload, config = engine.offload, engine.config
    activations = probe.peak_during(lambda: profile_steps(engine))
    used, total = probe.used_and_total()
    pool = offload.cache.slots.nbytes  # the provisional pool, freed by the resize
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
    try:
        offload.resize(slots)
    except torch.OutOfMemoryError as exc:
        raise ConfigError(
            f"{slots} expert cache slots did not fit where the GPU had reported room: lower "
            "--gpu-memory-utilization or give --expert-cache-ratio"
        ) from exc
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
    """The largest steps the scheduler can form, on KV blocks borrowed from an empty cache (local
    attention layers' own pool holding only windows, as for real sequences):
    - a full budget of prefill chunks after cached context, each as long as the blocks allow
      (the path with a mask and a gathered context);
    - a full budget of prompts' first chunks (the path that attends within the chunk);
    - every seat decoding, padded to the longest context the blocks leave;
    - all seats but one decoding beside a chunk ending the longest prompt the rest leave, then
      beside a prompt's first chunk;
    - half the seats decoding beside a chunk after a long context and first chunks filling the
      budget (each kind's tensors alive together), on a half, a quarter and a quarter of the
      blocks."""
    blocks = engine.blocks
    capacity = blocks.full_free if isinstance(blocks, WindowedBlocks) else blocks.num_free
    cfg, bs = engine.config, engine.config.block_size
    seats, budget, longest = cfg.max_num_seqs or 1, cfg.max_num_batched_tokens, engine.max_model_len
    cached = bs if longest > bs else 0
    first = min(budget, longest - cached)
    left = capacity - _blocks(longest, bs)
    lengths = [first, *_chunks(budget - first, seats - 1, left, cached, longest, bs)]
    spare = left - sum(_blocks(cached + n, bs) for n in lengths[1:])  # to push chunks later
    starts = [longest - first]
    for n in lengths[1:]:
        later = min(longest - n - cached, spare * bs) // bs * bs
        starts, spare = [*starts, cached + later], spare - later // bs
    _profile_step(engine, starts, lengths)
    firsts = _chunks(budget, seats, capacity, 0, longest - 1, bs)  # a prompt leaves a token
    _profile_step(engine, [0] * len(firsts), firsts)
    _profile_step(engine, *_decodes(capacity, min(seats, budget), longest, bs))
    if seats < 2:
        return
    chunk = min(budget - (seats - 1), longest - cached)
    end = longest if capacity - _blocks(longest, bs) >= seats - 1 else cached + chunk
    opening = min(budget - (seats - 1), longest - 1, (capacity - 1) * bs)
    for start, n in ((end - chunk, chunk), (0, opening)):  # after cached context, then as first
        if n > 0 and capacity > _blocks(start + n, bs):
            starts, lengths = _decodes(capacity - _blocks(start + n, bs), seats - 1, longest, bs)
            _profile_step(engine, [*starts, start], [*lengths, n])
    half, quarter = capacity // 2, capacity // 4
    if half < 1:
        return
    starts, lengths = _decodes(half, min(seats // 2, budget), longest, bs)
    n = min(budget - len(lengths), longest - cached, quarter * bs - cached)
    if n > 0:
        end = min(longest, quarter * bs)
        starts, lengths = [*starts, end - n], [*lengths, n]
    rest = capacity - half - quarter
    firsts = _chunks(budget - sum(lengths), seats - len(lengths), rest, 0, longest - 1, bs)
    _profile_step(engine, starts + [0] * len(firsts), lengths + firsts)


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def _chunks(tokens: int, seats: int, capacity: int, start: int, longest: int, bs: int) -> list[int]:
    """Lengths of chunks after `start` cached tokens that spend `tokens`, as far as `seats`
    sequences and `capacity` blocks go, each ending by `longest`."""
    lengths: list[int] = []
    while tokens > 0 and len(lengths) < seats:
        n = min(tokens, longest - start, capacity * bs - start)
        if n < 1:
            break
        lengths.append(n)
        tokens, capacity = tokens - n, capacity - _blocks(start + n, bs)
    return lengths


def _decodes(capacity: int, seats: int, longest: int, bs: int) -> tuple[list[int], list[int]]:
    """Starts and new tokens of the decodes whose padded context (seats x the longest one) is
    largest within `capacity` blocks: one sequence as long as the rest leave, each other a
    one-token prompt (a block; any single new token joins the padded group)."""

    def width(n: int) -> int:  # the longest context when n sequences decode
        return max(1, min(longest, (capacity - (n - 1)) * bs))

    most = max(1, min(seats, capacity))
    options = {most, capacity - _blocks(longest, bs) + 1, (capacity + 1) // 2}
    n = max((min(most, max(1, o)) for o in options), key=lambda o: o * width(o))
    return [width(n) - 1] + [0] * (n - 1), [1] * n


def _profile_step(engine: LLMEngine, starts: list[int], lengths: list[int]) -> None:
    """One forward of sequences at `starts` with `lengths` new tokens each, with the logits a
    step scores (a block of prompt logprobs, then a sampled row per sequence), on KV blocks and
    linear-attention states the engine holds already (so they do not count as activations)."""
    seq_ids = [-1 - i for i in range(len(starts))]  # negative: never a scheduler's sequence id
    device, vocab = engine.device, engine.model_config.vocab_size
    try:
        for seq_id, start, n in zip(seq_ids, starts, lengths, strict=True):
            if not _grow(engine.blocks, seq_id, start, n):
                raise ConfigError("the KV cache cannot hold the memory profile's sequences")
        tables, local_tables = engine.block_tables(seq_ids)
        batch = engine.runner.prefill_batch(lengths, tables, local_tables, starts, seq_ids)
        positions = [p for a, n in zip(starts, lengths, strict=True) for p in range(a, a + n)]
        ids = torch.tensor(positions, device=device) % vocab  # [T] any ids will do
        experts = SlotStandIn(engine.offload.cache, engine.model.cfg.gating)
        hidden = engine.model(ids, torch.tensor(positions, device=device), batch, experts)
        rows = hidden[:PROMPT_SCORE_ROWS]  # prompt logprobs, as the runner scores them
        scored(engine.model.logits(rows), ids[: len(rows)].tolist(), MAX_LOGPROBS)
        last = torch.tensor(lengths, device=device).cumsum(0) - 1  # [B]
        logits = engine.model.logits(hidden[last])  # [B, V]
        logits.float().softmax(-1).sort(-1, descending=True)  # the sampler's working copies
    finally:
        for seq_id in seq_ids:
            engine.blocks.free(seq_id)
            engine.runner.release_state(seq_id)


def _grow(blocks: BlockAllocator | WindowedBlocks, seq_id: int, start: int, n: int) -> bool:
    """Blocks for `start` cached and `n` new tokens; in the local pool only the window's, as a
    sequence that got there a block at a time holds (none are named: their tokens are not real)."""
    if isinstance(blocks, WindowedBlocks) and start:
        for end in (*range(blocks.block_size, start, blocks.block_size), start):
            if not blocks.grow(seq_id, end):
                return False
            blocks.release_behind(seq_id, end)
    return blocks.grow(seq_id, start + n)


class SlotStandIn:
    """Routed experts run from the provisional pool's slots, expert e from slot e modulo the pool
    (a layer's worth): the kernel's memory, without the copies. The values go unread. Each layer
    is added up in float32 as the split paths do (streaming through a pool smaller than a layer's
    experts, --resident-first, --cpu-expert-compute), which holds more than the common path's one
    call, so either path fits in what it measures."""

    def __init__(self, cache: ExpertCache, gating: Gating) -> None:
        self.cache, self.gating = cache, gating

    def __call__(
        self,
        layer: int,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        router_logits: torch.Tensor,
    ) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, k], topk_weights [T, k] -> [T, H]."""
        device, num_slots = hidden.device, self.cache.num_slots
        acc = torch.zeros(hidden.shape, dtype=torch.float32, device=device)  # [T, H]
        slot_of = torch.arange(router_logits.shape[-1], device=device) % num_slots  # [E]
        slots = slot_of[topk_ids]  # [T, k]
        in_group = torch.isin(slots, torch.arange(num_slots, device=device))  # [T, k]
        weights = torch.where(in_group, topk_weights, torch.zeros_like(topk_weights))  # [T, k]
        acc.add_(self.cache.slots.run(hidden, weights, slots, self.gating, float32=True))
        return acc.to(hidden.dtype)
