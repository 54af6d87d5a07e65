"""Iteration-level continuous batching: each step, every sequence's computed tokens catch up with its
known tokens (prompt + generated) within a token budget, so prefill chunks and decodes mix freely.

Admission needs free KV blocks, and first takes the cached blocks of the sequence's known prefix
(see blocks.py). A request's later choices (n > 1) wait until its first has computed their shared
prompt's full blocks, then take them from the cache: the prompt is computed once, not n times.
Their seats are kept meanwhile, so a later request cannot overtake them; choices that wait for a
seat after that find the prompt's blocks pinned (`_keep_prompts`), however far their first runs,
unless memory runs short.
When a running sequence cannot grow, the newest running sequence is preempted (its
blocks freed, recomputed later, from the prefix cache where its blocks survive). Pure policy over plain data: sequences only need the
attributes of `SchedulableSeq`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.blocks import BlockAllocator
from scheduler.step_selector import StepSelector

PIN_OWNERS = -(1 << 40)  # pins are held under PIN_OWNERS - seq_id: below every borrowed id


class SchedulableSeq(Protocol):
    seq_id: int
    num_computed_tokens: int
    token_ids: list[int]
    num_prompt_tokens: int
    # The request's first choice when this is a later one (n > 1): the same prompt, computed once.
    prompt_sibling: SchedulableSeq | None

    @property
    def num_tokens(self) -> int: ...

    @property
    def prefix_cacheable(self) -> bool:
        """May start from cached blocks (not when every prompt position must be computed)."""
        ...


@dataclass(frozen=True)
class BatchingConfig:
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class ScheduledBatch:
    seqs: list[SchedulableSeq] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[SchedulableSeq] = field(default_factory=list)
    # (admitted sequence, tokens it found in the prefix cache) for each sequence admitted
    admitted: list[tuple[SchedulableSeq, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(
        self, config: BatchingConfig, blocks: BlockAllocator, selector: StepSelector | None = None
    ) -> None:
        self.config, self.blocks, self.selector = config, blocks, selector
        self.waiting: deque[SchedulableSeq] = deque()
        self.running: list[SchedulableSeq] = []
        self._pins: dict[int, SchedulableSeq] = {}  # pin owner -> the first choice it serves

    def add(self, seq: SchedulableSeq) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._keep_prompts()
        budget = self.config.max_num_batched_tokens
        skipped = self._deferred_decodes()
        # A chunk that ends short of its sequence's tokens with budget left (at a shared prefix's
        # end, `_chunk`) admits no one: its next chunks, ahead in the running order, could take
        # the whole budget for as long as its prefill lasts, and a newcomer would not advance.
        stopped_short = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.seq_id in skipped:
                i += 1
                continue
            n = self._chunk(seq, budget)
            if self._make_room(seq, seq.num_computed_tokens + n, batch):
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                stopped_short |= seq.num_computed_tokens + n < seq.num_tokens
                i += 1
        # Seats and blocks kept for later choices waiting on their first: later requests cannot
        # take them. A block each: the prompt's last block, the one block a choice computes
        # itself (the full ones before it are shared).
        held = 0
        for seq in list(self.waiting):
            if (
                batch.preempted  # memory is short: admitting now would only preempt again
                or budget <= 0
                or stopped_short
                or len(self.running) + held >= self.config.max_num_seqs
            ):
                break
            if self._awaits_sibling(seq):
                held += 1
                continue
            cached = self.blocks.match(seq.seq_id, seq.token_ids) if seq.prefix_cacheable else 0
            seq.num_computed_tokens = cached
            if self._has_waiting_siblings(seq) and self._shareable(seq) > cached:
                self.blocks.diverge_at(seq.seq_id, self._shareable(seq))
            n = self._chunk(seq, budget)
            wanted = self.blocks.blocks_for(cached + n) - len(self.blocks.table(seq.seq_id))
            if wanted > self.blocks.num_free - held or not self.blocks.grow(seq.seq_id, cached + n):
                self.blocks.free(seq.seq_id)  # give back the matched blocks too
                seq.num_computed_tokens = 0
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            batch.admitted.append((seq, cached))
            budget -= n
            stopped_short |= seq.num_computed_tokens + n < seq.num_tokens
        return batch

    def _chunk(self, seq: SchedulableSeq, budget: int) -> int:
        """Tokens `seq` computes this step: what it lacks, within the budget, ending at a shared
        prefix's end where the engine should keep a linear state (BlockAllocator.divergence)."""
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        stops = [x for x in self.blocks.divergence(seq.seq_id) if x > seq.num_computed_tokens]
        return min(n, stops[0] - seq.num_computed_tokens) if stops else n

    def _awaits_sibling(self, seq: SchedulableSeq) -> bool:
        """Whether `seq` should wait for its running first sibling to compute the full blocks of
        their prompt (all it could take from the cache; the last token is always computed)."""
        sibling = seq.prompt_sibling
        if not self.blocks.prefix_caching or not seq.prefix_cacheable or sibling is None:
            return False
        return sibling.num_computed_tokens < self._shareable(seq) and sibling in self.running

    def _shareable(self, seq: SchedulableSeq) -> int:
        """Tokens of the prompt's full blocks, short of its last token (always computed)."""
        return (seq.num_prompt_tokens - 1) // self.blocks.block_size * self.blocks.block_size

    def _has_waiting_siblings(self, seq: SchedulableSeq) -> bool:
        """Whether later choices of `seq`'s request wait for it: with linear attention it then
        ends a chunk at their shared blocks' end, where its state is kept for them."""
        return self.blocks.resumable is not None and any(
            s.prompt_sibling is seq for s in self.waiting
        )

    def _keep_prompts(self) -> None:
        """Pin the shared prompt blocks of each first choice whose later choices wait for a seat,
        unpin them once none waits. Otherwise the first, decoding on, hands a local layer's
        window blocks back (or, finishing, all of them), and other sequences may reuse them
        before the later choices start. Pins give way to memory: a preempted first's, and all
        of them while nothing runs, go (the blocks stay cached, unpinned). Linear-attention
        models resume from the first's kept state instead, which a pin would not keep."""
        firsts = {
            s.prompt_sibling.seq_id: s.prompt_sibling
            for s in self.waiting
            if s.prompt_sibling is not None and s.prefix_cacheable
        }
        for owner, first in list(self._pins.items()):
            if first.seq_id not in firsts or first in self.waiting or not self.running:
                self.blocks.free(owner)
                del self._pins[owner]
        if not self.blocks.prefix_caching or self.blocks.resumable is not None:
            return
        pinned = {first.seq_id for first in self._pins.values()}
        for seq_id, first in firsts.items():
            shared = self._shareable(first)
            if (
                seq_id not in pinned
                and first in self.running
                and 0 < shared <= first.num_computed_tokens
            ):
                owner = PIN_OWNERS - seq_id  # no sequence's id, nor one borrowed for tracing
                self.blocks.pin(owner, seq_id, shared)
                self._pins[owner] = first

    def _deferred_decodes(self) -> set[int]:
        """Decodes the step selector leaves out of this step (none without a selector)."""
        if self.selector is None:
            return set()
        decodes = [s.seq_id for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        chosen = set(self.selector.select(decodes))
        return {seq_id for i, seq_id in enumerate(decodes) if i not in chosen}

    def _make_room(self, seq: SchedulableSeq, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Grow `seq` to `num_tokens`, preempting the newest running sequences; False if `seq` itself went."""
        while not self.blocks.grow(seq.seq_id, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: SchedulableSeq) -> None:
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self._keep_prompts()  # a preempted first's pin goes: memory is short

    def finish(self, seq: SchedulableSeq) -> None:
        """Drop a finished or aborted sequence from either queue and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        self._keep_prompts()  # an aborted request's pins go with its last waiting choice
