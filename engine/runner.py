"""One forward step over a scheduled batch, then sampling for the sequences that reached their end."""

from __future__ import annotations

import torch

from engine.attention import AttentionBatch, KVCache
from engine.models.layers import RoutingObserver
from engine.models.model import MoECausalLM
from engine.offload.experts import OffloadedExperts
from engine.offload.prefetch import Prefetcher
from engine.routes import RouteTracker
from engine.sampler import sample, token_logprobs
from engine.sequence import Sequence


class ModelRunner:
    def __init__(
        self,
        model: MoECausalLM,
        experts: OffloadedExperts,
        prefetcher: Prefetcher | None,
        routes: RouteTracker,
        kv: KVCache,
        device: torch.device | str,
        seed: int,
    ) -> None:
        self.model, self.experts, self.kv, self.device = model, experts, kv, device
        self.prefetcher, self.routes = prefetcher, routes
        self.observers = Observers([o for o in (prefetcher, routes) if o is not None])
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def execute(
        self, seqs: list[Sequence], num_new_tokens: list[int], block_tables: list[list[int]]
    ) -> tuple[list[Sequence], list[int], list[tuple[float, list[tuple[int, float]]] | None]]:
        """Run the new tokens of each sequence; return the sequences that sample, their tokens, logprobs."""
        self.experts.begin_step()
        starts = [s.num_computed_tokens for s in seqs]
        ids = [
            t
            for s, a, n in zip(seqs, starts, num_new_tokens, strict=True)
            for t in s.token_ids[a : a + n]
        ]
        positions = [
            p for a, n in zip(starts, num_new_tokens, strict=True) for p in range(a, a + n)
        ]
        batch = AttentionBatch.build(self.kv, block_tables, starts, num_new_tokens, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [T]
        if self.prefetcher is not None:
            window = self.prefetcher.predictor.context_window
            self.prefetcher.begin_step(
                input_ids, context_windows(seqs, starts, num_new_tokens, window)
            )
        hidden = self.model(
            input_ids,
            torch.tensor(positions, device=self.device),
            batch,
            self.experts,
            self.observers,
        )
        last_rows, sampling = [], []
        row = -1
        for seq, start, n in zip(seqs, starts, num_new_tokens, strict=True):
            row += n
            if start + n == seq.num_tokens:  # caught up with every known token: sample the next one
                last_rows.append(row)
                sampling.append(seq)
        self.routes.record([s.seq_id for s in sampling], last_rows)
        if not sampling:
            return [], [], []
        logits = self.model.logits(hidden[last_rows])  # [B, V]
        tokens = sample(logits, sampling, self.generator)
        return sampling, tokens, token_logprobs(logits, tokens, sampling)


class Observers:
    """Fans one MoE layer's routing out to every observer (prefetcher, route tracker)."""

    def __init__(self, observers: list[RoutingObserver]) -> None:
        self.observers = observers

    def on_route(
        self,
        layer: int,
        residual: torch.Tensor,
        router_logits: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> None:
        for observer in self.observers:
            observer.on_route(layer, residual, router_logits, topk_ids)


def context_windows(
    seqs: list[Sequence], starts: list[int], num_new_tokens: list[int], window: int
) -> torch.Tensor:
    """The `window` token ids before each new token, -1 where the sequence has none: [T, W]."""
    rows = []
    for seq, start, n in zip(seqs, starts, num_new_tokens, strict=True):
        padded = [-1] * window + seq.token_ids[: start + n]
        rows.extend(padded[start + i : start + i + window] for i in range(n))
    return torch.tensor(rows, dtype=torch.long).view(len(rows), window)
