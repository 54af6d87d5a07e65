"""KV blocks of models with local attention layers (gpt-oss's sliding windows, Llama 4's chunks):
a second pool for those layers, whose blocks a sequence hands back once its window has passed
them, so a long context holds only its window there.

Both pools name full blocks alike (the chained hash of the tokens up to their end), and a block
handed back stays named while free. A sequence resumes after a cached prefix only where both
hold it: the full-attention layers' every block, the local layers' blocks from the window of its
first new token on (vLLM's hybrid allocator keeps sliding-window blocks the same way). Prefix
names and the rest of the scheduler's view are the full pool's; usage counts both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scheduler.blocks import BlockAllocator

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.family_config import LocalAttention


def block_pools(
    num_blocks: int,
    local_blocks: int,
    cfg: EngineConfig,
    window: LocalAttention | None,
    resumable: Callable[[bytes], bool] | None,
) -> BlockAllocator | WindowedBlocks:
    """The engine's block accounting: one pool, or two when local layers have their own."""
    full = BlockAllocator(num_blocks, cfg.block_size, cfg.enable_prefix_caching, resumable)
    if not local_blocks or window is None:
        return full
    local = BlockAllocator(local_blocks, cfg.block_size, cfg.enable_prefix_caching)
    return WindowedBlocks(full, local, window)


class WindowedBlocks:
    """A BlockAllocator to the scheduler and the engine, over the full and the local pool."""

    def __init__(self, full: BlockAllocator, local: BlockAllocator, window: LocalAttention) -> None:
        self.full, self.local, self.window = full, local, window

    def __getattr__(self, name: str) -> Any:  # block_size, prefix_caching, divergence...
        return getattr(self.full, name)

    @property
    def num_free(self) -> int:
        return min(self.full.num_free, self.local.num_free)

    @property
    def num_used(self) -> int:
        return self.full.num_used + self.local.num_used

    @property
    def num_blocks(self) -> int:
        return self.full.num_blocks + self.local.num_blocks

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def local_table(self, seq_id: int) -> list[int]:
        return self.local.table(seq_id)

    def grow(self, seq_id: int, num_tokens: int) -> bool:
        """Room in both pools, or nothing taken."""
        needed = self.full.blocks_for(num_tokens)
        if any(
            needed - len(pool.table(seq_id)) > pool.num_free for pool in (self.full, self.local)
        ):
            return False
        return self.full.grow(seq_id, num_tokens) and self.local.grow(seq_id, num_tokens)

    def free(self, seq_id: int) -> None:
        self.full.free(seq_id)
        self.local.free(seq_id)

    def match(self, seq_id: int, token_ids: list[int]) -> int:
        """The full pool's longest cached prefix, shortened to where the local pool still holds
        the window before it: past a block it lacks, only ends short of that block can do."""
        bs = self.full.block_size
        end = self.full.match(seq_id, token_ids) // bs  # in blocks
        names = list(self.full.chain(seq_id))
        while end:
            first = max(0, self.window.first_key(end * bs)) // bs
            missing = [i for i in range(first, end) if not self.local.holds(names[i])]
            if not missing:
                break
            end = missing[-1]
        if end < len(names):
            self.full.truncate(seq_id, end * bs)
        if end:
            first = max(0, self.window.first_key(end * bs)) // bs
            assert self.local.take_window(seq_id, names[:end], first)
        return end * bs

    def pin(self, owner: int, seq_id: int, num_tokens: int) -> None:
        """Hold the sequence's first `num_tokens` under `owner`: every block in the full pool,
        the window before their end in the local one (what a sequence resuming there takes)."""
        end = num_tokens // self.full.block_size
        names = self.full.chain(seq_id)[:end]
        self.full.take_window(owner, names, 0)
        first = max(0, self.window.first_key(end * self.full.block_size)) // self.full.block_size
        self.local.take_window(owner, names, first)  # nothing if a block was reused already

    def computed(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Name both pools' new full blocks, and hand back the local blocks the next token's
        window no longer reaches."""
        self.full.computed(seq_id, token_ids, num_computed)
        self.local.computed(seq_id, token_ids, num_computed)
        self.release_behind(seq_id, num_computed)

    def release_behind(self, seq_id: int, num_tokens: int) -> None:
        """Hand back the local blocks that the window of token `num_tokens` no longer reaches."""
        first = max(0, self.window.first_key(num_tokens)) // self.full.block_size
        self.local.release_before(seq_id, first)

    @property
    def full_free(self) -> int:
        """Free blocks of the full pool: what bounds contexts (the local pool holds windows)."""
        return self.full.num_free
