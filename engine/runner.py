"""One forward step over a scheduled batch, then sampling for the sequences that reached their end."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.attention import AttentionBatch
from engine.kv_cache import KVCache
from engine.linear_state import LinearStates
from engine.models.layers import RoutingObserver
from engine.models.model import MoECausalLM
from engine.offload.experts import OffloadedExperts
from engine.offload.prefetch import Prefetcher
from engine.routes import RouteTracker
from engine.sampler import Logprob, sample, scored, token_logprobs
from engine.sequence import Sequence

logger = logging.getLogger(__name__)
PROMPT_SCORE_ROWS = 256  # prompt positions scored per logits call (each row is vocab-sized)


@dataclass
class StepResult:
    sampled: list[Sequence]  # the sequences that got a new token, in batch order
    tokens: list[int]  # that token, per sampled sequence
    logprobs: list[Logprob | None]  # its logprobs, where the sequence asked for them
    # (sequence, first prompt position scored, one score per position) for prompt logprobs
    prompt_logprobs: list[tuple[Sequence, int, list[Logprob]]]
    blocked: list[Sequence] = field(default_factory=list)  # no token may follow (`sample`)


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
        max_num_seqs: int,
        num_snapshots: int = 0,
    ) -> None:
        """`num_snapshots`: linear-attention states kept at block boundaries for prefix caching."""
        self.model, self.experts, self.kv, self.device = model, experts, kv, device
        linear = model.cfg.linear_attention  # Qwen3-Next's: a state per running sequence
        self.states = None
        if linear is not None:
            self.states = LinearStates(linear, max_num_seqs, kv.dtype, device, num_snapshots)
            logger.info(
                "linear-attention state: %.1f MiB for %d sequences and %d snapshots",
                self.states.nbytes / 2**20,
                max_num_seqs,
                num_snapshots,
            )
        self.prefetcher, self.routes = prefetcher, routes
        self.observers = Observers([o for o in (prefetcher, routes) if o is not None])
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def execute(
        self,
        seqs: list[Sequence],
        num_new_tokens: list[int],
        block_tables: list[list[int]],
        local_tables: list[list[int]] | None = None,
    ) -> StepResult:
        """Run the new tokens of each sequence; sample for those that reached their end.
        `local_tables`: the local attention layers' own blocks, where they have a pool."""
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
        batch = self._attention_batch(block_tables, starts, num_new_tokens, local_tables)
        if self.states is not None:
            batch.linear = self.states.batch([s.seq_id for s in seqs], starts, num_new_tokens)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [T]
        if self.prefetcher is not None:
            window = self.prefetcher.predictor.context_window
            context = context_windows(seqs, starts, num_new_tokens, window)  # on the host
            self.prefetcher.begin_step(input_ids, context.to(self.device))  # the ids' device
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
        prompt_logprobs = self._prompt_logprobs(hidden, seqs, starts, num_new_tokens)
        if not sampling:
            return StepResult([], [], [], prompt_logprobs)
        logits = self.model.logits(hidden[last_rows])  # [B, V]
        drawn = sample(logits, sampling, self.generator)
        rows = [i for i, token in enumerate(drawn) if token is not None]
        tokens = [token for token in drawn if token is not None]
        sampled = [sampling[i] for i in rows]
        blocked = [seq for seq, token in zip(sampling, drawn, strict=True) if token is None]
        logprobs = token_logprobs(logits[rows], tokens, sampled)
        return StepResult(sampled, tokens, logprobs, prompt_logprobs, blocked)

    def prefill_batch(
        self,
        lengths: list[int],
        block_tables: list[list[int]],
        local_tables: list[list[int]] | None = None,
        starts: list[int] | None = None,
        borrow: list[int] | None = None,
    ) -> AttentionBatch:
        """A batch of whole prompts (or, from `starts`, their last tokens) outside the schedule
        (tracing, the memory profile, tests), on the given KV blocks (`LLMEngine.block_tables`).
        Their linear-attention states start at zero in a pool of their own, dropped with the
        batch, or with `borrow` in the runner's pool under those ids, which the caller releases."""
        starts = starts or [0] * len(lengths)
        batch = self._attention_batch(block_tables, starts, lengths, local_tables)
        linear = self.model.cfg.linear_attention
        if linear is not None:
            states, ids = self.states, borrow
            if states is None or ids is None:
                states = LinearStates(linear, len(lengths), self.kv.dtype, self.device)
                ids = list(range(len(lengths)))
            states.batch(ids, [0] * len(lengths), lengths)  # zero states, whatever `starts`
            batch.linear = states.batch(ids, starts, lengths)
        return batch

    def _attention_batch(
        self,
        block_tables: list[list[int]],
        starts: list[int],
        lengths: list[int],
        local_tables: list[list[int]] | None,
    ) -> AttentionBatch:
        window = self.model.cfg.local_attention  # local layers read only the blocks it reaches
        return AttentionBatch.build(
            self.kv, block_tables, starts, lengths, self.device, window, local_tables
        )

    def forget(self, seq_id: int) -> None:
        """A sequence is done (finished or aborted): drop its routes and its linear state."""
        self.routes.forget(seq_id)
        self.release_state(seq_id)

    def release_state(self, seq_id: int) -> None:
        if self.states is not None:
            self.states.release(seq_id)

    def _prompt_logprobs(
        self,
        hidden: torch.Tensor,
        seqs: list[Sequence],
        starts: list[int],
        num_new_tokens: list[int],
    ) -> list[tuple[Sequence, int, list[Logprob]]]:
        """Score the prompt tokens this step's chunks predict: the row at position p gives the
        logprob of prompt token p + 1. Only a request's first choice asks (the prompt is the
        same for all n); a chunk recomputed after preemption scores the same positions again."""
        result = []
        row = 0
        for seq, start, n in zip(seqs, starts, num_new_tokens, strict=True):
            k = seq.params.prompt_logprobs
            end = min(start + n, seq.num_prompt_tokens - 1)  # positions start..end-1 are scored
            if k is not None and seq.index == 0 and end > start:
                scores = []
                for a in range(start, end, PROMPT_SCORE_ROWS):  # bounded [rows, V] logits
                    b = min(a + PROMPT_SCORE_ROWS, end)
                    logits = self.model.logits(hidden[row + a - start : row + b - start])
                    scores += scored(logits, seq.token_ids[a + 1 : b + 1], k)
                result.append((seq, start + 1, scores))
            row += n
        return result


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
    """The `window` token ids before each new token, nearest first (the order the predictors
    were trained on: `TraceSet.context`), -1 where the sequence has none: [T, W]."""
    rows = []
    for seq, start, n in zip(seqs, starts, num_new_tokens, strict=True):
        first = max(start - window, 0)
        before = seq.token_ids[first : start + n][::-1] + [-1] * window  # nearest first
        rows.extend(before[n - i : n - i + window] for i in range(n))
    return torch.tensor(rows, dtype=torch.long).view(len(rows), window)
