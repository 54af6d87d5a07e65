"""Routing traces: which experts every MoE layer chose for each token of a corpus, as training and
evaluation data for the predictors.

One safetensors file, N tokens, L MoE layers, E experts, top-k, P = L(L-1)/2 layer pairs:
  token_ids  int32   [N]        the token
  positions  int32   [N]        position in its sequence (a chunk of `seq_len` tokens; 0 starts one)
  doc_ids    int32   [N]        document = index of its corpus file in `documents`
  topk_ids   int16   [N, L, k]  experts routed at each MoE layer, by descending router probability
  probs      float16 [N, L, E]  each MoE layer's full router probabilities
  pregate    float16 [N, P, E]  pre-gate probabilities for layer j computed after layer i, for the
                                pairs i < j in order (0,1), (0,2), .., (0,L-1), (1,2), .., (L-2,L-1)
The header's metadata key "expertflow_trace" holds `TraceMeta` as JSON. Tokens of one sequence are
contiguous, so a token's context (the ids before it in its sequence) is the run of rows above it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.models.model import MoECausalLM
from engine.offload.predict.corpus import read_corpus
from engine.offload.predict.files import check_tensors, read_header, reading
from engine.offload.predict.pregate import PreGatePredictor
from engine.offload.predict.rpp import model_name, routing_dims
from engine.progress import progress

logger = logging.getLogger(__name__)

TRACE_FORMAT = 1
METADATA_KEY = "expertflow_trace"
TENSORS = ("token_ids", "positions", "doc_ids", "topk_ids", "probs", "pregate")


@dataclass(frozen=True)
class TraceMeta:
    model: str
    moe_layers: tuple[int, ...]  # decoder layer index of each MoE layer
    num_experts: int
    top_k: int
    vocab_size: int
    seq_len: int
    documents: tuple[str, ...]  # doc_id -> corpus file

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def dims(self) -> dict[str, int]:
        return routing_dims(self.num_layers, self.num_experts, self.top_k, self.vocab_size)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """(source i, target j) of each row of the pregate axis."""
        n = self.num_layers
        return tuple((i, j) for i in range(n) for j in range(i + 1, n))


@dataclass(frozen=True)
class TraceSet:
    meta: TraceMeta
    token_ids: torch.Tensor  # [N] int32
    positions: torch.Tensor  # [N] int32
    doc_ids: torch.Tensor  # [N] int32
    topk_ids: torch.Tensor  # [N, L, k] int16
    probs: torch.Tensor  # [N, L, E] float16
    pregate: torch.Tensor  # [N, P, E] float16

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def pair_index(self, source: int, target: int) -> int:
        """Row of the pregate axis that predicts MoE layer `target` from after layer `source`."""
        n = self.meta.num_layers
        if not 0 <= source < target < n:
            raise ValueError(f"no pre-gate pair ({source}, {target}) for {n} MoE layers")
        return source * (n - 1) - source * (source - 1) // 2 + (target - source - 1)

    def routes(self) -> torch.Tensor:
        """Multi-hot routes: [N, L, E] float32, 1 where the expert was in the token's top-k."""
        out = torch.zeros(len(self), self.meta.num_layers, self.meta.num_experts)
        return out.scatter_(2, self.topk_ids.long(), 1.0)

    def context(self, window: int) -> torch.Tensor:
        """The `window` ids before each token in its sequence, nearest first, -1 = none: [N, W]."""
        ids, pos = self.token_ids.long(), self.positions.long()
        cols = []
        for back in range(1, window + 1):
            shifted = torch.cat([ids.new_full((back,), -1), ids[:-back]])[: len(self)]
            cols.append(torch.where(pos >= back, shifted, -1))
        return torch.stack(cols, dim=1) if cols else ids.new_zeros((len(self), 0))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSORS}

    def select_documents(self, docs: torch.Tensor) -> TraceSet:
        """The tokens of the given document ids (whole sequences, so contexts stay valid)."""
        keep = torch.isin(self.doc_ids, docs.to(self.doc_ids.dtype))
        return replace(self, **{name: t[keep] for name, t in self.tensors().items()})

    def split(self, fraction: float, seed: int) -> tuple[TraceSet, TraceSet]:
        """(train, held-out) by document: no text of a held-out document is seen in training."""
        docs = torch.unique(self.doc_ids)
        if docs.numel() < 2:
            raise ValueError(
                f"a held-out split needs at least 2 documents, the trace has {docs.numel()}: "
                "trace more corpus files"
            )
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"held-out fraction {fraction} must be in (0, 1)")
        order = docs[torch.randperm(docs.numel(), generator=torch.Generator().manual_seed(seed))]
        num_held = min(docs.numel() - 1, max(1, round(fraction * docs.numel())))
        return self.select_documents(order[num_held:]), self.select_documents(order[:num_held])

    def save(self, path: str | Path) -> None:
        meta = {"format": TRACE_FORMAT, **asdict(self.meta)}
        save_file(
            {name: t.contiguous() for name, t in self.tensors().items()},
            str(path),
            metadata={METADATA_KEY: json.dumps(meta)},
        )

    @classmethod
    def load(cls, path: str | Path) -> TraceSet:
        raw = read_header(
            path,
            "trace",
            METADATA_KEY,
            TRACE_FORMAT,
            "record one: expertflow trace",
            "re-record it",
        )
        with reading(path, "trace"):
            del raw["format"]
            raw = {
                **raw,
                "moe_layers": tuple(raw["moe_layers"]),
                "documents": tuple(raw["documents"]),
            }
            with safe_open(str(path), framework="pt") as f:
                traces = cls(
                    meta=TraceMeta(**raw), **{name: f.get_tensor(name) for name in TENSORS}
                )
            m, n = traces.meta, len(traces)
            L, E, P = m.num_layers, m.num_experts, len(m.pairs)
            wanted = {  # name: shape, dtype, bound of its values (None: any)
                "token_ids": ((n,), torch.int32, m.vocab_size),
                "positions": ((n,), torch.int32, m.seq_len),
                "doc_ids": ((n,), torch.int32, len(m.documents)),
                "topk_ids": ((n, L, m.top_k), torch.int16, E),
                "probs": ((n, L, E), torch.float16, None),
                "pregate": ((n, P, E), torch.float16, None),
            }
            check_tensors(path, traces.tensors(), wanted, "re-record the trace")
        return traces

    @classmethod
    def concat(cls, meta: TraceMeta, parts: list[TraceSet]) -> TraceSet:
        return cls(
            meta=meta, **{name: torch.cat([getattr(p, name) for p in parts]) for name in TENSORS}
        )


class _RouteRecorder:
    """A RoutingObserver that keeps one forward's routing, and the pre-gate guesses made from it."""

    def __init__(self, model: MoECausalLM, token_ids: torch.Tensor) -> None:
        self.moe_index = {layer: i for i, layer in enumerate(model.cfg.moe_layers)}
        self.pregate = PreGatePredictor(model)
        self.token_ids = token_ids  # [T]
        n = len(self.moe_index)
        self.topk: list[torch.Tensor] = [torch.empty(0)] * n
        self.probs: list[torch.Tensor] = [torch.empty(0)] * n
        self.ahead: list[torch.Tensor] = [torch.empty(0)] * n

    def on_route(
        self,
        layer: int,
        residual: torch.Tensor,
        router_logits: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> None:
        i = self.moe_index[layer]
        self.topk[i] = topk_ids.to("cpu", torch.int16)  # [T, k]
        probs = self.pregate.routers[i].probabilities(router_logits)  # [T, E]
        self.probs[i] = probs.to("cpu", torch.float16)  # [T, E]
        ahead = self.pregate.ahead(i, residual, self.token_ids, topk_ids, len(self.probs))
        self.ahead[i] = ahead.to("cpu", torch.float16)  # [L-1-i, T, E]

    def collect(
        self, ids: list[int], positions: list[int], docs: list[int], meta: TraceMeta
    ) -> TraceSet:
        def i32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32)

        return TraceSet(
            meta=meta,
            token_ids=i32(ids),
            positions=i32(positions),
            doc_ids=i32(docs),
            topk_ids=torch.stack(self.topk, dim=1),  # [T, L, k]
            probs=torch.stack(self.probs, dim=1),  # [T, L, E]
            pregate=torch.cat(self.ahead, dim=0).transpose(0, 1).contiguous(),  # [T, P, E]
        )


def record_traces(
    llm: LLM, files: list[Path], seq_len: int, max_tokens: int | None = None
) -> TraceSet:
    """Prefill the corpus in chunks of `seq_len` tokens and record every token's routing. Under
    teacher forcing a causal model routes each token exactly as decoding the same text would."""
    documents, chunks = read_corpus(llm.tokenizer, files, seq_len, max_tokens)
    return _trace_chunks(llm, documents, chunks, seq_len)


def trace_sequences(llm: LLM, sequences: list[list[int]], names: list[str]) -> TraceSet:
    """Record the routing of whole token sequences, one document each (e.g. a benchmark's prompts
    followed by the tokens it generated: the routing its live run took)."""
    chunks = list(enumerate(sequences))
    return _trace_chunks(llm, names, chunks, max((len(s) for s in sequences), default=0))


@torch.inference_mode()
def _trace_chunks(
    llm: LLM, documents: list[str], chunks: list[tuple[int, list[int]]], seq_len: int
) -> TraceSet:
    engine = llm.engine
    if seq_len > engine.max_model_len:
        raise ValueError(
            f"seq_len={seq_len} exceeds the engine's max_model_len={engine.max_model_len}"
        )
    if not any(c for _, c in chunks):
        raise ValueError("the corpus holds no tokens")
    cfg = engine.model_config
    meta = TraceMeta(
        model=model_name(str(engine.config.model)),
        moe_layers=tuple(cfg.moe_layers),
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        vocab_size=cfg.vocab_size,
        seq_len=seq_len,
        documents=tuple(documents),
    )
    per_step = max(
        1, min(engine.config.max_num_seqs, engine.config.max_num_batched_tokens // seq_len)
    )
    parts: list[TraceSet] = []
    total = sum(len(c) for _, c in chunks)
    with progress(total=total, desc="tracing", unit="tok") as bar:
        for start in range(0, len(chunks), per_step):
            group = chunks[start : start + per_step]
            parts.append(_trace_step(engine, group, meta))
            bar.update(sum(len(c) for _, c in group))
    traces = TraceSet.concat(meta, parts)
    logger.info("traced %d tokens of %d documents", len(traces), len(documents))
    return traces


def _trace_step(engine: LLMEngine, group: list[tuple[int, list[int]]], meta: TraceMeta) -> TraceSet:
    """One prefill forward over a few chunks, each its own sequence on borrowed KV blocks."""
    seq_ids = [-1 - r for r in range(len(group))]  # negative: never a scheduler's sequence id
    lengths = [len(c) for _, c in group]
    try:
        for seq_id, n in zip(seq_ids, lengths, strict=True):
            if not engine.blocks.grow(seq_id, n):
                raise ValueError("not enough KV blocks to trace; lower --seq-len")
        batch = engine.runner.prefill_batch(lengths, *engine.block_tables(seq_ids))
        ids = [t for _, c in group for t in c]
        positions = [p for n in lengths for p in range(n)]
        docs = [d for d, c in group for _ in c]
        input_ids = torch.tensor(ids, device=engine.device)  # [T]
        recorder = _RouteRecorder(engine.model, input_ids)
        engine.model(
            input_ids,
            torch.tensor(positions, device=engine.device),  # [T]
            batch,
            engine.offload.experts,
            recorder,
        )
        return recorder.collect(ids, positions, docs, meta)
    finally:
        for seq_id in seq_ids:
            engine.blocks.free(seq_id)
