"""Two block pools for models with local attention layers: the local one hands blocks back behind
the window and resumes a prefix only where it still holds the window before it."""

from __future__ import annotations

from engine.family_config import LocalAttention
from scheduler.block_pools import WindowedBlocks
from scheduler.blocks import RELEASED, BlockAllocator

BLOCK = 4


def pools(local_blocks: int, window: LocalAttention) -> WindowedBlocks:
    full = BlockAllocator(16, BLOCK, prefix_caching=True)
    return WindowedBlocks(full, BlockAllocator(local_blocks, BLOCK, prefix_caching=True), window)


def run(blocks: WindowedBlocks, seq_id: int, tokens: list[int], step: int = 4) -> None:
    """A sequence computing `tokens` a few at a time, as the engine steps it."""
    for done in range(step, len(tokens) + step, step):
        done = min(done, len(tokens))
        assert blocks.grow(seq_id, done)
        blocks.computed(seq_id, tokens, done)


def test_blocks_behind_the_window_go_back_to_the_local_pool() -> None:
    blocks = pools(5, LocalAttention(6))  # a query sees itself and the 5 keys before it
    run(blocks, 0, list(range(18)))
    local = blocks.local_table(0)
    # the next token (position 18) sees 13..18: blocks 0-2 are behind it
    assert local[:3] == [RELEASED] * 3 and RELEASED not in local[3:]
    assert blocks.local.num_used == 2 and blocks.full.num_used == 5
    blocks.free(0)
    assert blocks.num_used == 0


def test_chunks_release_whole_chunks() -> None:
    blocks = pools(6, LocalAttention(8, chunked=True))
    run(blocks, 0, list(range(17)))
    # position 17 is in the chunk 16..23: everything before 16 goes
    assert blocks.local_table(0)[:4] == [RELEASED] * 4 and blocks.local.num_used == 1


def test_a_prefix_resumes_only_where_the_local_pool_holds_its_window() -> None:
    blocks = pools(5, LocalAttention(6))
    prompt = list(range(18))
    run(blocks, 0, prompt)
    blocks.free(0)
    # the window of position 16 (the last full block's end) starts at 11: blocks 2 and 3
    assert blocks.match(1, prompt) == 16
    assert blocks.local_table(1) == [RELEASED, RELEASED, *blocks.local_table(1)[2:]]
    blocks.free(1)
    run(blocks, 2, [50 + t for t in range(20)])  # other tokens take the free local blocks over
    blocks.free(2)
    assert blocks.match(3, prompt) == 0  # the full pool still holds the prefix, the local not
    assert blocks.num_used == 0  # the full pool's matched blocks were given back
