"""scheduler/batching.py + scheduler/blocks.py: continuous batching as pure policy over fake sequences."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from scheduler.batching import BatchingConfig, ScheduledBatch, Scheduler
from scheduler.blocks import BlockAllocator

BLOCK = 4  # tokens per KV block in these tests


@dataclass(eq=False)
class FakeSeq:
    """What the scheduler needs of a sequence; `target` is the length at which it finishes."""

    seq_id: int
    num_tokens: int
    target: int = 1 << 30
    num_computed_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # only read with prefix caching
    prefix_cacheable: bool = False
    num_prompt_tokens: int = 0
    prompt_sibling: FakeSeq | None = None


def make(num_blocks: int, max_num_seqs: int = 64, max_num_batched_tokens: int = 1024) -> Scheduler:
    return Scheduler(
        BatchingConfig(max_num_seqs, max_num_batched_tokens), BlockAllocator(num_blocks, BLOCK)
    )


def execute(sched: Scheduler, batch: ScheduledBatch) -> list[FakeSeq]:
    """What the engine does after a step: advance, sample one token per caught-up sequence, finish."""
    finished = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        assert n >= 1
        assert seq.num_computed_tokens + n <= seq.num_tokens
        # the scheduler reserved KV for every token this step writes
        assert len(sched.blocks.table(seq.seq_id)) * BLOCK >= seq.num_computed_tokens + n
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.num_tokens += 1
            if seq.num_tokens >= seq.target:
                sched.finish(seq)
                finished.append(seq)
    return finished


def check_invariants(sched: Scheduler, seqs: list[FakeSeq]) -> None:
    blocks = sched.blocks
    tables = [blocks.table(s.seq_id) for s in seqs]
    owned = [b for t in tables for b in t]
    assert len(owned) == len(set(owned)), "a block is owned by two sequences"
    assert all(0 <= b < blocks.num_blocks for b in owned)
    assert len(owned) == blocks.num_used
    assert blocks.num_free + blocks.num_used == blocks.num_blocks
    for seq in sched.waiting:
        assert seq.num_computed_tokens == 0 and blocks.table(seq.seq_id) == []
    for seq in sched.running:
        assert len(blocks.table(seq.seq_id)) >= blocks.blocks_for(seq.num_computed_tokens)
    assert not set(map(id, sched.waiting)) & set(map(id, sched.running))


def test_allocator_grow_is_all_or_nothing_and_free_returns_blocks() -> None:
    blocks = BlockAllocator(num_blocks=3, block_size=BLOCK)
    assert blocks.grow(7, 5) and len(blocks.table(7)) == 2
    assert blocks.grow(7, 8) and len(blocks.table(7)) == 2  # still fits in two blocks
    assert not blocks.grow(8, 9)  # needs 3 blocks, 1 free: takes nothing
    assert blocks.table(8) == [] and blocks.num_free == 1
    assert not blocks.grow(7, 13)  # growing past capacity keeps what it had
    assert len(blocks.table(7)) == 2
    blocks.free(7)
    blocks.free(7)  # freeing twice (or an unknown id) is harmless
    assert blocks.num_free == 3 and blocks.usage == 0.0
    assert blocks.grow(8, 12) and sorted(blocks.table(8)) == [0, 1, 2]


def test_token_budget_is_respected_and_mixes_prefill_with_decode() -> None:
    sched = make(num_blocks=64, max_num_batched_tokens=20)
    seqs = [FakeSeq(i, num_tokens=7, target=12) for i in range(6)]
    for seq in seqs:
        sched.add(seq)
    first = sched.schedule()
    assert first.num_new_tokens == [7, 7, 6]  # the third prompt is cut to fill the budget exactly
    execute(sched, first)
    second = sched.schedule()
    # decodes of the first two, the rest of the third prompt, then new prompts in the leftover budget
    assert second.num_new_tokens[:3] == [1, 1, 1]
    assert second.seqs[:3] == seqs[:3]
    steps = 0
    while sched.has_work():
        batch = second if steps == 0 else sched.schedule()
        assert 0 < batch.num_tokens <= 20
        execute(sched, batch)
        check_invariants(sched, seqs)
        steps += 1
    assert all(s.num_tokens == 12 for s in seqs)
    assert sched.blocks.num_used == 0


def test_max_num_seqs_is_respected() -> None:
    sched = make(num_blocks=64, max_num_seqs=3)
    seqs = [FakeSeq(i, num_tokens=3, target=6) for i in range(8)]
    for seq in seqs:
        sched.add(seq)
    admitted_order = []
    while sched.has_work():
        batch = sched.schedule()
        assert len(batch) <= 3 and len(sched.running) <= 3
        admitted_order += [s.seq_id for s in batch.seqs if s.seq_id not in admitted_order]
        execute(sched, batch)
    assert admitted_order == list(range(8))  # first come, first served
    assert sched.blocks.num_used == 0


def test_long_prompt_is_prefilled_in_chunks() -> None:
    sched = make(num_blocks=64, max_num_batched_tokens=16)
    seq = FakeSeq(0, num_tokens=50)
    sched.add(seq)
    chunks = []
    while seq.num_tokens == 50:
        batch = sched.schedule()
        assert batch.seqs == [seq]
        chunks.append(batch.num_new_tokens[0])
        # KV grows with the chunk, not with the whole prompt up front
        assert len(sched.blocks.table(0)) == sched.blocks.blocks_for(
            seq.num_computed_tokens + chunks[-1]
        )
        execute(sched, batch)
    assert chunks == [16, 16, 16, 2]
    assert seq.num_computed_tokens == 50 and seq.num_tokens == 51  # sampled after the last chunk
    assert sched.schedule().num_new_tokens == [1]


def test_no_one_is_admitted_behind_a_prefill_that_stopped_short_of_the_budget() -> None:
    """A linear-attention prefill ends a chunk where a later sequence will resume (`divergence`),
    leaving budget over. A sequence admitted into it would then wait, running, behind that
    prefill's next chunks, each taking the whole budget, for as long as the prefill lasts."""
    blocks = BlockAllocator(32, BLOCK, prefix_caching=True, resumable=lambda name: False)
    sched = Scheduler(BatchingConfig(max_num_seqs=8, max_num_batched_tokens=6), blocks)
    prompt = list(range(40))
    blocks.grow(-1, 8)  # an earlier request computed two blocks of this prompt, kept no state
    blocks.computed(-1, prompt, 8)
    blocks.free(-1)
    long = FakeSeq(0, 40, token_ids=prompt, prefix_cacheable=True, num_prompt_tokens=40)
    short = FakeSeq(1, 2, token_ids=[50, 51], prefix_cacheable=True, num_prompt_tokens=2)
    sched.add(long)
    sched.add(short)
    while long.num_computed_tokens < 40:
        batch = sched.schedule()
        assert set(batch.seqs) == set(sched.running)  # every running sequence advances
        execute(sched, batch)
    assert short in sched.running  # admitted with the budget the prefill's end left


def test_admission_waits_for_free_blocks() -> None:
    sched = make(num_blocks=4)  # 16 tokens of KV
    a, b, c = FakeSeq(0, 10, target=12), FakeSeq(1, 8, target=10), FakeSeq(2, 2, target=3)
    for seq in (a, b, c):
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == [a]  # b needs 2 blocks, 1 is free; c may not jump the queue
    assert list(sched.waiting) == [b, c]
    assert sched.blocks.table(b.seq_id) == [] and sched.blocks.num_free == 1
    while a in sched.running or a.num_tokens < a.target:
        execute(sched, batch)
        batch = sched.schedule()
    assert batch.seqs == [b, c]  # a finished and freed its blocks: both fit now
    check_invariants(sched, [a, b, c])


def test_newest_running_sequence_is_preempted_when_an_older_one_cannot_grow() -> None:
    sched = make(num_blocks=4)
    old, new = FakeSeq(0, 7), FakeSeq(1, 7)
    later = FakeSeq(2, 2)
    for seq in (old, new):
        sched.add(seq)
    for _ in range(2):  # prefill to 7 (2 blocks each), then decode to 8: the cache is full
        execute(sched, sched.schedule())
    sched.add(later)
    assert sched.blocks.num_free == 0 and old.num_tokens == new.num_tokens == 9
    batch = sched.schedule()  # old needs a 3rd block for token 9
    assert batch.preempted == [new]
    assert batch.seqs == [old] and batch.num_new_tokens == [1]
    assert new.num_computed_tokens == 0 and sched.blocks.table(new.seq_id) == []
    assert list(sched.waiting) == [new, later]  # back at the front, ahead of newer arrivals
    assert sched.running == [old] and len(sched.blocks.table(old.seq_id)) == 3
    check_invariants(sched, [old, new, later])
    sched.finish(old)
    batch = sched.schedule()
    assert batch.seqs == [new, later]
    assert batch.num_new_tokens == [9, 2]  # recomputed from scratch: prompt and generated tokens


def test_a_sequence_that_cannot_grow_alone_preempts_itself() -> None:
    sched = make(num_blocks=2)
    seq = FakeSeq(0, 8)
    sched.add(seq)
    execute(sched, sched.schedule())
    batch = sched.schedule()  # token 9 needs a third block that does not exist
    assert batch.seqs == [] and batch.preempted == [seq]
    assert list(sched.waiting) == [seq] and sched.blocks.num_used == 0


@pytest.mark.parametrize("where", ["running", "waiting"])
def test_finish_frees_blocks_from_either_queue(where: str) -> None:
    sched = make(num_blocks=8)
    a, b = FakeSeq(0, 9), FakeSeq(1, 30)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.running == [a] and list(sched.waiting) == [b]
    target = a if where == "running" else b
    sched.finish(target)
    assert target not in sched.running and target not in sched.waiting
    assert sched.blocks.table(target.seq_id) == []
    sched.finish(a)
    sched.finish(b)
    assert sched.blocks.num_used == 0 and not sched.has_work()


def test_random_workload_leaks_no_block() -> None:
    rng = random.Random(1234)
    preemptions = 0
    for trial in range(20):
        num_blocks = rng.randint(10, 40)
        budget = rng.randint(4, 64)
        sched = make(num_blocks, max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=budget)
        capacity = num_blocks * BLOCK
        seqs: list[FakeSeq] = []
        live: list[FakeSeq] = []
        for step in range(400):
            if len(seqs) < 30 and rng.random() < 0.3:
                prompt = rng.randint(1, 40)
                target = min(prompt + rng.randint(1, 25), capacity)
                seq = FakeSeq(1000 * trial + len(seqs), prompt, target=max(target, prompt + 1))
                seqs.append(seq)
                live.append(seq)
                sched.add(seq)
            if live and rng.random() < 0.05:  # a client goes away
                gone = live.pop(rng.randrange(len(live)))
                sched.finish(gone)
            batch = sched.schedule()
            assert batch.num_tokens <= budget
            assert len(sched.running) <= sched.config.max_num_seqs
            assert all(s.num_computed_tokens == 0 for s in batch.preempted)
            preemptions += len(batch.preempted)
            for seq in execute(sched, batch):
                live.remove(seq)
            check_invariants(sched, seqs)
            if step > 200 and not sched.has_work():
                break
        while sched.has_work():  # drain: everything left must finish, nothing may livelock
            step += 1
            assert step < 5000, "the workload did not drain"
            for seq in execute(sched, sched.schedule()):
                live.remove(seq)
            check_invariants(sched, seqs)
        assert not live
        assert sched.blocks.num_used == 0 and sched.blocks.num_free == num_blocks
        # every block id came back exactly once
        assert sched.blocks.grow(-1, capacity)
        assert sorted(sched.blocks.table(-1)) == list(range(num_blocks))
    assert preemptions > 0, "the workload never put the cache under pressure"
