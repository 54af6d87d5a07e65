"""Perplexity of held-out documents decoded teacher-forced through the engine's own step (one token
per sequence per step, every document side by side), with its offload statistics: what
benchmarks/scheduling.py measures cache-aware routing's quality cost by."""

from __future__ import annotations

import gc
import math

import torch

from engine import LLM
from engine.attention import AttentionBatch


def perplexity(model: str, docs: list[list[int]], **flags: object) -> tuple[float, dict]:
    """Teacher-forced decode, one token per sequence per step, all docs side by side."""
    llm = LLM(model=model, max_num_seqs=len(docs), **flags)
    with torch.inference_mode():
        result = _teacher_forced(llm, docs)
    # Free the engine now: caught in a reference cycle, it was left to the interpreter's last
    # collection at exit, where the process aborted in about one run in eight.
    del llm
    gc.collect()
    return result


def _teacher_forced(llm: LLM, docs: list[list[int]]) -> tuple[float, dict]:
    engine = llm.engine
    length = min(len(d) for d in docs)
    seq_ids = [-1 - i for i in range(len(docs))]
    states = engine.runner.states  # linear-attention layers' (Qwen3-Next), if any
    ids = torch.tensor([d[:length] for d in docs])  # [B, N]
    nll, count = 0.0, 0
    for pos in range(length - 1):
        for seq_id, doc in zip(seq_ids, docs, strict=True):
            if pos:  # what the last step computed: local layers hand blocks behind it back
                engine.blocks.computed(seq_id, doc, pos)
            assert engine.blocks.grow(seq_id, pos + 1)
        tables, local_tables = engine.block_tables(seq_ids)
        window = engine.model_config.local_attention
        batch = AttentionBatch.build(
            engine.kv,
            tables,
            [pos] * len(docs),
            [1] * len(docs),
            engine.device,
            window,
            local_tables,
        )
        if states is not None:
            batch.linear = states.batch(seq_ids, [pos] * len(docs), [1] * len(docs))
        engine.offload.experts.begin_step()
        hidden = engine.model(
            ids[:, pos], torch.full((len(docs),), pos), batch, engine.offload.experts
        )
        logp = torch.log_softmax(engine.model.logits(hidden), dim=-1)  # [B, V]
        nll -= logp.gather(1, ids[:, pos + 1, None]).sum().item()
        count += len(docs)
    stats = llm.offload_stats()
    stats["rerouted"] = engine.offload.experts.rerouted
    engine.offload.close()
    return math.exp(nll / count), stats
