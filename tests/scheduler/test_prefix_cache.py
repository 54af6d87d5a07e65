"""scheduler/blocks.py's prefix cache: named full blocks, shared by reference, reused least recently
freed first; and the scheduler admitting sequences from it under random load."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from scheduler.batching import BatchingConfig, Scheduler
from scheduler.blocks import BlockAllocator

BLOCK = 4


def computed(blocks: BlockAllocator, seq_id: int, tokens: list[int]) -> None:
    """A sequence that computed all of `tokens`, as the engine leaves it after its steps."""
    assert blocks.grow(seq_id, len(tokens))
    blocks.computed(seq_id, tokens, len(tokens))


def test_a_later_sequence_takes_the_blocks_of_its_known_prefix() -> None:
    blocks = BlockAllocator(8, BLOCK, prefix_caching=True)
    first = list(range(10))  # two full blocks and a partial one
    computed(blocks, 0, first)
    assert blocks.match(1, first[:9] + [99, 98]) == 8  # both full blocks, shared
    assert blocks.table(1) == blocks.table(0)[:2]
    assert blocks.num_used == 3  # nothing new was taken
    assert blocks.match(2, [0, 1, 2, 7, 4, 5, 6, 7, 8]) == 0  # differs inside the first block
    assert blocks.match(3, first[:8]) == 4  # the last token is always left to compute
    blocks.free(0)
    assert blocks.num_used == 2  # still held by sequences 1 and 3
    assert blocks.match(4, first) == 8  # the freed blocks keep their contents


def test_same_tokens_after_a_different_prefix_do_not_match() -> None:
    blocks = BlockAllocator(8, BLOCK, prefix_caching=True)
    computed(blocks, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert blocks.match(1, [9, 9, 9, 9, 5, 6, 7, 8, 9]) == 0  # block 2 equal, its prefix not


def test_reuse_forgets_the_name_and_takes_the_tail_before_the_head() -> None:
    blocks = BlockAllocator(4, BLOCK, prefix_caching=True)
    tokens = list(range(16))
    computed(blocks, 0, tokens)
    head, *_, tail = blocks.table(0)
    blocks.free(0)
    assert blocks.grow(1, 1) and blocks.table(1) == [tail]  # the tail is reused first
    assert blocks.match(2, tokens) == 12  # the first three blocks are still known
    assert blocks.table(2)[0] == head
    blocks.free(2)
    blocks.free(1)
    assert blocks.grow(3, 16)  # every block reused: every name forgotten
    assert blocks.match(4, tokens) == 0


def test_off_by_default() -> None:
    blocks = BlockAllocator(8, BLOCK)
    computed(blocks, 0, list(range(9)))
    assert blocks.match(1, list(range(9))) == 0


@dataclass(eq=False)
class PromptSeq:
    seq_id: int
    token_ids: list[int]
    target: int
    num_computed_tokens: int = 0
    prefix_cacheable: bool = True
    prompt_sibling: PromptSeq | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def test_random_load_with_shared_prefixes_keeps_the_books_straight() -> None:
    """Prompts drawn from a few shared prefixes under KV pressure (preemption included): a block is
    shared only by sequences whose computed tokens agree on all of it, and every block is counted
    once as free or used."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    sched = Scheduler(BatchingConfig(6, 24), BlockAllocator(24, BLOCK, prefix_caching=True))
    live: list[PromptSeq] = []
    hits = 0
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 5))]
            seq = PromptSeq(step, prompt, len(prompt) + rng.randrange(1, 8))
            sched.add(seq)
            live.append(seq)
        batch = sched.schedule()
        hits += sum(cached for _, cached in batch.admitted)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            sched.blocks.computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(rng.randrange(50))
                if seq.num_tokens >= seq.target:
                    sched.finish(seq)
                    live.remove(seq)
        owners: dict[int, list[PromptSeq]] = {}
        for seq in sched.running:
            for i, block in enumerate(sched.blocks.table(seq.seq_id)):
                owners.setdefault(block, []).append(seq)
                if len(owners[block]) > 1:  # shared: full, computed and equal in every owner
                    end = (i + 1) * BLOCK
                    assert all(s.num_computed_tokens >= end for s in owners[block])
                    assert len({tuple(s.token_ids[:end]) for s in owners[block]}) == 1
        assert sched.blocks.num_used == len(owners)
    assert not live and sched.blocks.num_used == 0
    assert hits > 0


def test_later_choices_wait_for_the_first_to_compute_their_prompt() -> None:
    """n = 3: the prompt's full blocks are computed once, by the first choice over two steps; the
    others are admitted when it has them and compute only the prompt's partial last block."""
    sched = Scheduler(BatchingConfig(8, 6), BlockAllocator(16, BLOCK, prefix_caching=True))
    prompt = list(range(10))  # two full blocks and a partial one
    first = PromptSeq(0, list(prompt), 11)
    later = [PromptSeq(i, list(prompt), 11, prompt_sibling=first) for i in (1, 2)]
    other = PromptSeq(3, [50, 51], 3)  # a later request is not held up behind them
    for seq in (first, *later, other):
        sched.add(seq)
    admitted = []
    for _ in range(4):
        batch = sched.schedule()
        admitted.append([(seq.seq_id, cached) for seq, cached in batch.admitted])
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            sched.blocks.computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
    assert admitted[0] == [(0, 0)]  # the budget of 6 goes to the first choice's prompt
    assert admitted[1] == [(3, 0)]  # the first is 2 tokens short of its full blocks
    assert admitted[2] == [(1, 8), (2, 8)]  # its 8 full-block tokens, shared
    assert all(s.num_computed_tokens == 10 for s in (first, *later))
    assert sched.blocks.num_used == 3 + 2 + 1  # the first's 3 blocks, a last block each, other's


@pytest.mark.parametrize(
    ("max_num_seqs", "num_blocks"),
    [(2, 16), (8, 6)],
    ids=["seats-run-short", "blocks-run-short"],
)
def test_a_later_request_does_not_take_what_a_waiting_choice_needs(
    max_num_seqs: int, num_blocks: int
) -> None:
    """Request A with n = 2, then request B. With two seats, A's second choice keeps its seat;
    with six blocks, A's first takes three and A's second will need one of its own (its partial
    last block), so B, wanting three, waits instead of taking it."""
    blocks = BlockAllocator(num_blocks, BLOCK, prefix_caching=True)
    sched = Scheduler(BatchingConfig(max_num_seqs, 64), blocks)
    first = PromptSeq(0, list(range(10)), 11)
    second = PromptSeq(1, list(range(10)), 11, prompt_sibling=first)
    later = PromptSeq(2, list(range(60, 70)), 11)
    for seq in (first, second, later):
        sched.add(seq)
    admitted = []
    for _ in range(2):
        batch = sched.schedule()
        admitted.append([seq.seq_id for seq, _ in batch.admitted])
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            sched.blocks.computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
    assert admitted == [[0], [1]]
    assert list(sched.waiting) == [later] and sched.blocks.table(later.seq_id) == []


def test_a_prefix_is_matched_only_up_to_where_a_sequence_may_resume() -> None:
    """Models with linear attention resume only after a block whose state was kept: the match
    stops at the longest such prefix and takes no block beyond it."""
    kept: set[bytes] = set()
    blocks = BlockAllocator(8, BLOCK, prefix_caching=True, resumable=kept.__contains__)
    first = list(range(13))  # three full blocks
    computed(blocks, 0, first)
    assert blocks.match(1, first) == 0  # no state kept anywhere
    assert blocks.num_used == 4 and blocks.table(1) == []
    assert blocks.divergence(1) == [12]  # where sequence 1 should keep a state for later ones
    kept.add(blocks.name_of_prefix(0, 4))
    assert blocks.match(2, first) == 4  # blocks 2 and 3 are cached but not resumable
    assert blocks.table(2) == blocks.table(0)[:1] and blocks.num_used == 4
    assert blocks.divergence(2) == [12]
    blocks.diverge_at(2, 8)  # a later choice of its request will resume at 8: stop there too
    assert blocks.divergence(2) == [8, 12]
    kept.add(blocks.name_of_prefix(0, 12))
    assert blocks.match(3, first) == 12 and blocks.divergence(3) == []
    blocks.free(1)
    assert blocks.divergence(1) == []
    plain = BlockAllocator(8, BLOCK, prefix_caching=False, resumable=kept.__contains__)
    plain.diverge_at(0, 4)  # no prefix caching: no state is kept for anyone, no chunk ends early
    assert plain.divergence(0) == []
    blocks.free(0)
    blocks.free(2)
    blocks.free(3)
    assert blocks.num_used == 0  # every reference the matches took was given back
