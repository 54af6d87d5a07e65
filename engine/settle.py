"""Flags whose defaults depend on the checkpoint, settled once config.json is read: `--dtype auto`
(`serving_dtype`), `--max-model-len` (`context_length`) and, for linear-attention models,
`--max-num-seqs`."""

from __future__ import annotations

import dataclasses
import logging

from engine.config import DEFAULT_MAX_NUM_SEQS, ConfigError, EngineConfig, serving_dtype
from engine.model_config import ModelConfig

logger = logging.getLogger(__name__)
DEFAULT_STATE_BYTES = 1 << 30  # linear-attention states when --max-num-seqs is not given


def settled(mc: ModelConfig, cfg: EngineConfig) -> EngineConfig:
    """`cfg` with its checkpoint-dependent defaults made concrete."""
    dtype = serving_dtype(cfg.dtype, cfg.device, mc.checkpoint_dtype)
    return with_max_num_seqs(mc, dataclasses.replace(cfg, dtype=dtype))


def context_length(mc: ModelConfig, cfg: EngineConfig) -> int:
    """--max-model-len, or the model's max_position_embeddings; within the model's, and at least
    one KV block: each sequence holds a whole block, so a block past the context is never filled,
    the default cache fits fewer sequences than --max-num-seqs, and every step attends over the
    empty rest of each."""
    length = cfg.max_model_len or mc.max_position_embeddings
    if length > mc.max_position_embeddings:
        raise ConfigError(
            f"max_model_len={length} exceeds the model's max_position_embeddings="
            f"{mc.max_position_embeddings}"
        )
    if cfg.block_size > length:
        raise ConfigError(
            f"block_size={cfg.block_size} exceeds max_model_len={length}: a sequence would hold a "
            "whole block it can never fill; lower --block-size"
        )
    return length


def with_max_num_seqs(mc: ModelConfig, cfg: EngineConfig) -> EngineConfig:
    """`cfg` with --max-num-seqs settled: as given, or DEFAULT_MAX_NUM_SEQS, lowered for a
    linear-attention model to what DEFAULT_STATE_BYTES holds of its states (each running
    sequence's and, with prefix caching, as many snapshots), allocated at start like the KV."""
    if cfg.max_num_seqs is not None:
        return cfg
    seqs = DEFAULT_MAX_NUM_SEQS
    if mc.linear_attention is not None:
        copies = 2 if cfg.enable_prefix_caching else 1
        per_seq = copies * mc.linear_attention.state_bytes(cfg.torch_dtype.itemsize)
        seqs = max(1, min(seqs, DEFAULT_STATE_BYTES // per_seq))
        if seqs < DEFAULT_MAX_NUM_SEQS:
            logger.warning(
                "max_num_seqs=%d: %.0f MiB of linear-attention state a sequence; set "
                "--max-num-seqs for more",
                seqs,
                per_seq / 2**20,
            )
    return dataclasses.replace(cfg, max_num_seqs=seqs)
