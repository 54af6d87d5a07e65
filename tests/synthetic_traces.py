"""Small synthetic routing traces, for tests of the predictor files and commands that need no model."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.offload.predict.trace import TraceMeta, TraceSet

L, E, K, VOCAB, SEQ = 3, 4, 2, 50, 16


def synthetic_traces(num_docs: int, seed: int = 0) -> TraceSet:
    """Random routing of random tokens: document i holds 12 + i tokens (one or two sequences),
    so a count of tokens tells which documents were counted."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.arange(num_docs) + 12
    n = int(lengths.sum())
    doc_ids = torch.repeat_interleave(torch.arange(num_docs), lengths)  # [N]
    starts = torch.cumsum(lengths, 0) - lengths
    documents = tuple(f"doc{i}" for i in range(num_docs))
    meta = TraceMeta("tiny-model", tuple(range(L)), E, K, VOCAB, SEQ, documents)
    probs = torch.rand(n, L, E, generator=g).softmax(-1)
    return TraceSet(
        meta=meta,
        token_ids=torch.randint(0, VOCAB, (n,), generator=g, dtype=torch.int32),
        positions=((torch.arange(n) - starts[doc_ids]) % SEQ).to(torch.int32),
        doc_ids=doc_ids.to(torch.int32),
        topk_ids=probs.topk(K, -1).indices.to(torch.int16),
        probs=probs.half(),
        pregate=torch.rand(n, len(meta.pairs), E, generator=g).softmax(-1).half(),
    )


def rewrite_header(path: Path, key: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Hand-edit the JSON under metadata `key` of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()[key])
    edit(header)
    save_file(tensors, str(path), metadata={key: json.dumps(header)})


def reorder(traces: TraceSet, order: list[int], names: list[str] | None = None) -> TraceSet:
    """The same documents in another `order` (and under other `names`), as a trace of the same
    corpus listed otherwise would hold them."""
    parts = []
    for new, old in enumerate(order):
        part = traces.select_documents(torch.tensor([old]))
        parts.append(replace(part, doc_ids=torch.full_like(part.doc_ids, new)))
    documents = tuple(names or [traces.meta.documents[d] for d in order])
    return TraceSet.concat(replace(traces.meta, documents=documents), parts)
