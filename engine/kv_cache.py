"""The paged KV cache: one key and one value tensor per layer, addressed by slot, how many blocks
it gets (`num_kv_blocks`; `local_kv_blocks` for local attention layers' own pool), and how a
step's attention reads a run of whole blocks back from it (`gather`)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch

from engine.config import ConfigError, EngineConfig
from engine.model_config import ModelConfig
from kernels.fp8 import widen

logger = logging.getLogger(__name__)
DEFAULT_KV_BYTES = 1 << 30  # KV budget when --kv-cache-blocks is not given


def num_kv_blocks(mc: ModelConfig, cfg: EngineConfig, max_model_len: int) -> int:
    """--kv-cache-blocks, or as many as `max_num_seqs` full-length sequences need within
    DEFAULT_KV_BYTES (only the layers that attend over the cache count, local ones at the size
    of their own pool); at least one sequence, past the budget on CUDA (whose memory the expert
    cache's sizing then checks), an error on the CPU. The full-attention layers' pool."""
    min_blocks = -(-max_model_len // cfg.block_size)
    if cfg.kv_cache_blocks is not None:
        if cfg.kv_cache_blocks < min_blocks:
            raise ConfigError(
                f"kv_cache_blocks={cfg.kv_cache_blocks} cannot hold one max_model_len="
                f"{max_model_len} sequence ({min_blocks} blocks needed)"
            )
        return cfg.kv_cache_blocks
    kv_heads, key_dim, value_dim = mc.kv_cache_geometry
    itemsize = cfg.torch_kv_cache_dtype.itemsize
    block_bytes = kv_heads * (key_dim + value_dim) * itemsize * cfg.block_size  # a layer's
    local = _local_layers(mc)
    budget = DEFAULT_KV_BYTES - len(local) * block_bytes * _local_need(mc, cfg, max_model_len)
    wanted = -(-cfg.max_num_seqs * max_model_len // cfg.block_size)
    affordable = max(0, budget) // ((len(mc.attention_layers) - len(local)) * block_bytes or 1)
    if affordable < min_blocks and cfg.device == "cuda":  # the GPU's memory is checked later
        logger.warning(
            "the default KV budget holds %d tokens, less than max_model_len=%d: one context's "
            "%d blocks instead (--kv-cache-blocks sets them)",
            affordable * cfg.block_size,
            max_model_len,
            min_blocks,
        )
        return min_blocks
    if affordable < min_blocks:
        raise ConfigError(
            f"the default KV budget holds {affordable * cfg.block_size} tokens, less than "
            f"max_model_len={max_model_len}: lower --max-model-len or set --kv-cache-blocks"
        )
    return min(wanted, affordable)


def _local_layers(mc: ModelConfig) -> tuple[int, ...]:
    """The local attention layers, which have a pool of their own."""
    return mc.local_layers if mc.local_attention is not None else ()


def _local_need(mc: ModelConfig, cfg: EngineConfig, max_model_len: int) -> int:
    """Blocks the local layers' pool needs: each running sequence's window (a chunk's keys, or
    its last `size`) and a partial block, and a step's new tokens; at least one whole context
    (tracing prefills one at once)."""
    if not _local_layers(mc):
        return 0
    assert mc.local_attention is not None
    per_seq = -(-mc.local_attention.size // cfg.block_size) + 2
    new_tokens = -(-cfg.max_num_batched_tokens // cfg.block_size)
    return max(-(-max_model_len // cfg.block_size), cfg.max_num_seqs * per_seq + new_tokens)


def local_kv_blocks(
    mc: ModelConfig, cfg: EngineConfig, full_blocks: int, max_model_len: int
) -> int:
    """Blocks of the local attention layers' own pool (0: the model has none): what it needs,
    no more than the full pool, whose prefixes it must hold too to resume them."""
    return min(full_blocks, _local_need(mc, cfg, max_model_len))


@dataclass
class KVCache:
    """Paged KV storage: one [num_blocks * block_size, kv_heads, dim] key and value tensor per layer.
    With no value tensors (`v` empty) values are the leading channels of the keys: MLA's latent.
    The tensors may hold FP8 (`--kv-cache-dtype`, half of bfloat16's bytes, so twice the tokens):
    keys and values are rounded to it once, saturating at its largest value (no scale: as vLLM
    without calibrated scales), and attention reads them back in `dtype`. New tokens attend over
    their rounded keys too, so chunking and prefix caching change no more than they do with a
    cache of the model's dtype (nothing in float32)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int
    dtype: torch.dtype  # what attention computes in

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        geometry: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        cache_dtype: torch.dtype | None = None,
        uncached: Collection[int] = (),
        local: tuple[Collection[int], int] = ((), 0),
    ) -> KVCache:
        """geometry: (kv heads, key dim, value dim), value dim 0 when values live in the keys.
        cache_dtype: what the cache holds, `dtype` when None. `uncached` layers (Qwen3-Next's
        linear-attention ones) get empty tensors; `local` (layers, blocks): local attention
        layers hold that many blocks, their own pool (scheduler/block_pools.py)."""
        kv_heads, key_dim, value_dim = geometry
        stored = cache_dtype or dtype
        local_layers, local_blocks = local

        def make(dim: int) -> list[torch.Tensor]:
            rows = [
                0 if i in uncached else (local_blocks if i in local_layers else num_blocks)
                for i in range(num_layers)
            ]
            return [
                torch.zeros((n * block_size, kv_heads, dim), dtype=stored, device=device)
                for n in rows
            ]

        if stored.itemsize == 1:
            limit = torch.finfo(stored).max
            logger.warning("KV cache in %s, no scale: values past +-%g saturate", stored, limit)
        k, v = make(key_dim), make(value_dim) if value_dim else []
        return cls(k=k, v=v, block_size=block_size, dtype=dtype)

    @classmethod
    def for_model(
        cls,
        mc: ModelConfig,
        cfg: EngineConfig,
        num_blocks: int,
        local_blocks: int,
        device: torch.device | str,
    ) -> KVCache:
        """The engine's cache: `num_blocks` for the full-attention layers, `local_blocks` for the
        local ones, none for linear-attention layers."""
        try:
            return cls.allocate(
                mc.num_layers,
                num_blocks,
                cfg.block_size,
                mc.kv_cache_geometry,
                cfg.torch_dtype,
                device,
                cfg.torch_kv_cache_dtype,
                uncached=mc.linear_attention.layers if mc.linear_attention else (),
                local=(mc.local_layers if local_blocks else (), local_blocks),
            )
        except torch.OutOfMemoryError as exc:
            raise ConfigError(
                f"the KV cache ({num_blocks} blocks of {cfg.block_size} tokens) does not fit in "
                "GPU memory beside the model: lower --max-model-len, --kv-cache-blocks or "
                "--max-num-seqs, or use --kv-cache-dtype fp8"
            ) from exc

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        """x as the cache will hold it, read back: itself unless the cache is narrower (FP8),
        where values past its range saturate rather than turn into NaN."""
        if self.cache_dtype == x.dtype:
            return x
        limit = torch.finfo(self.cache_dtype).max
        return x.clamp(-limit, limit).to(self.cache_dtype).to(x.dtype)


def raw(t: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as its bytes: the CPU has no index_select / index_copy_ for float8."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def gather(
    cache: torch.Tensor, blocks: torch.Tensor, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The slots of `blocks` [N] of a cache [slots, kvh, D], in order, as `dtype`:
    [N * block_size, kvh, D]. A block gathers as one contiguous row (an FP8 one as its bytes)."""
    rows = raw(cache).view(-1, block_size * cache.shape[1] * cache.shape[2])
    rows = rows.index_select(0, blocks).view(cache.dtype).view(-1, *cache.shape[1:])
    return rows if cache.dtype == dtype else widen(rows, dtype)
