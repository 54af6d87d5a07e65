"""KV block accounting: which blocks each sequence owns, and which full blocks hold a known prefix.

Pure bookkeeping; the tensors live in the engine. With prefix caching, every full block a sequence
has computed is named by a chained SHA-256 of all tokens up to its end, so a later sequence that
starts with the same tokens (a chat's next turn, a shared system prompt, a preempted sequence coming
back) takes those blocks instead of computing them again. Blocks are reference-counted; a block no
sequence holds is free but keeps its contents, and is reused (its name forgotten) in least recently
freed order, a sequence's tail before its head. A model with linear attention can resume only
after a prefix whose recurrent state the engine kept (`resumable`): matches stop there. Where a
longer known prefix has no state (a system prompt that an earlier request shared, unknowingly,
before it diverged), the matching sequence is told to end a chunk at that prefix's end
(`divergence`), so that its state is kept there and the next sequence resumes after it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable

RELEASED = -1  # a table entry whose block was handed back (behind a local layer's window)


class BlockAllocator:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool = False,
        resumable: Callable[[bytes], bool] | None = None,
    ) -> None:
        """`resumable(name)`: whether a sequence may resume after the prefix that block names
        (models with linear attention: where its state was kept); None: after any."""
        self.num_blocks, self.block_size, self.prefix_caching = (
            num_blocks,
            block_size,
            prefix_caching,
        )
        self.resumable = resumable
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._chains: dict[int, list[bytes]] = {}  # seq -> names of its computed full blocks
        self._named: dict[bytes, int] = {}  # name -> block holding that prefix
        self._name_of: dict[int, bytes] = {}
        self._divergence: dict[int, list[int]] = {}  # seq -> where to keep states, ascending

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
        for _ in range(max(extra, 0)):
            block, _ = self._free.popitem(last=False)
            name = self._name_of.pop(block, None)
            if name is not None:
                del self._named[name]
            self._refs[block] = 1
            table.append(block)
        return True

    def free(self, seq_id: int) -> None:
        self._chains.pop(seq_id, None)
        self._divergence.pop(seq_id, None)
        for block in reversed(self._tables.pop(seq_id, [])):  # the tail is reused first
            self._unref(block)

    def _unref(self, block: int) -> None:
        if block == RELEASED:
            return
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free[block] = None

    def release_before(self, seq_id: int, num_blocks: int) -> None:
        """Hand back the sequence's blocks before its `num_blocks`-th (a local layer's window has
        passed them); their table entries become RELEASED. They keep their names while free."""
        table = self._tables.get(seq_id, [])
        for i in range(min(num_blocks, len(table))):
            self._unref(table[i])
            table[i] = RELEASED

    def holds(self, name: bytes) -> bool:
        """Whether a block holding the prefix `name` names is cached (held or free)."""
        return name in self._named

    def chain(self, seq_id: int) -> list[bytes]:
        """The names of the sequence's computed or matched full blocks, in order."""
        return self._chains.get(seq_id, [])

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Give back what a match took past `num_tokens` (a whole number of blocks)."""
        keep = num_tokens // self.block_size
        table, chain = self._tables.get(seq_id, []), self._chains.get(seq_id, [])
        for block in table[keep:]:
            self._unref(block)
        del table[keep:], chain[keep:]
        if not table:
            self.free(seq_id)

    def take_window(self, seq_id: int, names: list[bytes], first: int) -> bool:
        """Give a sequence without blocks the named blocks first..len(names)-1 of a prefix whose
        blocks are `names` (those before `first` are not needed: RELEASED); False, taking
        nothing, if one of them is not cached."""
        blocks = [self._named.get(name) for name in names[first:]]
        if any(b is None for b in blocks) or seq_id in self._tables:
            return False
        for block in blocks:
            assert block is not None
            self._refs[block] += 1
            self._free.pop(block, None)
        if names:
            self._tables[seq_id] = [RELEASED] * first + [b for b in blocks if b is not None]
            self._chains[seq_id] = list(names)
        return True

    def pin(self, owner: int, seq_id: int, num_tokens: int) -> None:
        """Hold the sequence's first `num_tokens` (whole blocks, computed) under `owner`, a key
        no sequence uses, until `free(owner)`: they stay cached whatever the sequence does."""
        self.take_window(owner, self.chain(seq_id)[: num_tokens // self.block_size], 0)

    def match(self, seq_id: int, token_ids: list[int]) -> int:
        """Give a sequence without blocks the cached blocks of its longest known prefix; returns the
        tokens they hold. The last token is always left to compute: its logits are needed."""
        if not self.prefix_caching or seq_id in self._tables:
            return 0
        chain: list[bytes] = []
        table: list[int] = []
        usable = 0  # blocks of the longest prefix a sequence may resume after
        for end in range(self.block_size, len(token_ids), self.block_size):
            name = self._name(chain, token_ids[end - self.block_size : end])
            block = self._named.get(name)
            if block is None:
                break
            chain.append(name)
            table.append(block)
            if self.resumable is None or self.resumable(name):
                usable = len(table)
        if usable < len(table):  # a longer prefix is known, but not resumable
            self._divergence[seq_id] = [len(table) * self.block_size]
        chain, table = chain[:usable], table[:usable]
        for block in table:
            self._refs[block] += 1
            self._free.pop(block, None)
        if table:
            self._tables[seq_id], self._chains[seq_id] = table, chain
        return len(table) * self.block_size

    def diverge_at(self, seq_id: int, num_tokens: int) -> None:
        """Have the sequence also end a chunk after `num_tokens` (a whole number of blocks), as if
        a known prefix ended there: a linear state is kept there for sequences that will share it
        (a request's later choices)."""
        if self.resumable is not None and self.prefix_caching:
            self._divergence[seq_id] = sorted({*self._divergence.get(seq_id, []), num_tokens})

    def divergence(self, seq_id: int) -> list[int]:
        """Where the sequence should end chunks so that the engine keeps its state there for
        others (ascending token counts; none when empty): the longest known prefix of it that it
        could not resume after, and where its later choices will resume."""
        return self._divergence.get(seq_id, [])

    def computed(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Name the sequence's full blocks among its first `num_computed` tokens, so that later
        sequences can match them. A prefix already named keeps its first block."""
        if not self.prefix_caching:
            return
        chain = self._chains.setdefault(seq_id, [])
        table = self._tables[seq_id]
        for i in range(len(chain), num_computed // self.block_size):
            name = self._name(chain, token_ids[i * self.block_size : (i + 1) * self.block_size])
            chain.append(name)
            if name not in self._named and table[i] not in self._name_of:
                self._named[name], self._name_of[table[i]] = table[i], name

    def name_of_prefix(self, seq_id: int, num_tokens: int) -> bytes:
        """The name of the sequence's block that ends at `num_tokens` (a whole number of blocks,
        computed or matched)."""
        return self._chains[seq_id][num_tokens // self.block_size - 1]

    @staticmethod
    def _name(chain: list[bytes], tokens: list[int]) -> bytes:
        """SHA-256 of the previous block's name and this block's tokens: equal names, equal prefixes."""
        parent = chain[-1] if chain else b""
        return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()
