"""KV block accounting: which blocks each sequence owns. Pure bookkeeping; the tensors live in the engine."""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, seq_id: int, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens of this sequence; False (nothing taken) if blocks run out."""
        table = self._tables.setdefault(seq_id, [])
        extra = self.blocks_for(num_tokens) - len(table)
        if extra > len(self._free):
            if not table:
                del self._tables[seq_id]
            return False
        table.extend(self._free.popleft() for _ in range(max(extra, 0)))
        return True

    def free(self, seq_id: int) -> None:
        self._free.extend(self._tables.pop(seq_id, []))
