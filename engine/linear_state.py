"""The recurrent state of linear-attention layers (Qwen3-Next's Gated DeltaNet): what a sequence
carries from one step to the next in place of a KV cache, a fixed size whatever its length.

Each running sequence holds one slot of a pool sized to `max_num_seqs`: per linear layer, the last
K-1 inputs of its causal convolution and the delta rule's [value heads, key dim, value dim]
matrix (float32, as transformers keeps it). A slot is zeroed when its sequence computes from
position 0 (a new prompt, or one recomputed after preemption) and handed back when the sequence
finishes, is aborted or is preempted.

Without --max-num-seqs, such a model runs as many sequences as 1 GiB holds of their states and
snapshots (engine/settle.py): the pool is allocated at start, outside the KV budget.

Prefix caching needs the state at the end of a cached prefix, which the KV blocks do not hold:
whenever a step leaves a sequence exactly at a block boundary (a decode that fills a block, a
chunk that ends on one), its state is copied into a snapshot named like that block (`keep`). A
sequence owns one snapshot at a time, its latest, so sequences decoding elsewhere do not push
out a finished chat's; once the sequence is done, its last snapshot stays in the pool (as many
as slots, with prefix caching on) until the least recently used goes. A later sequence with that
prefix resumes from it (`resume`); the block allocator matches cached prefixes only up to a
boundary with one (`has`). A chat's next turn thus resumes after the last block boundary the
previous answer crossed. Requests sharing a system prompt resume after it from the third on: the
second learns where the first diverged from it and keeps a state there too.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.hybrid_config import LinearAttentionConfig


@dataclass
class LinearBatch:
    """Where a step's sequences keep their state: decodes (one new token) together, each longer
    run of new tokens (a prefill chunk) on its own."""

    states: LinearStates
    decode_rows: torch.Tensor | None  # [B] step rows of the one-token sequences
    decode_slots: torch.Tensor | None  # [B] their slots
    chunks: list[tuple[slice, int]]  # (step rows, slot) of each longer run


class LinearStates:
    def __init__(
        self,
        cfg: LinearAttentionConfig,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
        num_snapshots: int = 0,
    ) -> None:
        conv_shape = (num_slots, cfg.conv_dim, cfg.conv_kernel - 1)
        state_shape = (num_slots, cfg.num_value_heads, cfg.key_head_dim, cfg.value_head_dim)
        self.conv = {i: torch.zeros(conv_shape, dtype=dtype, device=device) for i in cfg.layers}
        self.recurrent = {
            i: torch.zeros(state_shape, dtype=torch.float32, device=device) for i in cfg.layers
        }
        self.device = device
        self._slot_of: dict[int, int] = {}
        self._free = list(range(num_slots))
        # snapshots at block boundaries: prefix name -> index into the snapshot tensors
        self.snap_conv = {
            i: t.new_zeros((num_snapshots, *t.shape[1:])) for i, t in self.conv.items()
        }
        self.snap_recurrent = {
            i: t.new_zeros((num_snapshots, *t.shape[1:])) for i, t in self.recurrent.items()
        }
        self._snapshots: OrderedDict[bytes, int] = OrderedDict()
        self._free_snapshots = list(range(num_snapshots))
        self._owned: dict[int, bytes] = {}  # running sequence -> the snapshot it took last

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        """The pool and its snapshots."""
        tensors = itertools.chain(
            self.conv.values(),
            self.recurrent.values(),
            self.snap_conv.values(),
            self.snap_recurrent.values(),
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def has(self, name: bytes) -> bool:
        return name in self._snapshots

    def keep(self, seq_id: int, name: bytes, shared: bool = False) -> None:
        """Snapshot a running sequence's state, which ends the prefix `name` names, in place of
        the sequence's previous snapshot; a `shared` prefix's (where sequences diverge) beside it,
        left to the pool's LRU order."""
        previous = None if shared else self._owned.pop(seq_id, None)
        if previous is not None and previous in self._snapshots and previous != name:
            self._free_snapshots.append(self._snapshots.pop(previous))
        if name in self._snapshots:
            self._snapshots.move_to_end(name)
            return
        if not self._free_snapshots:
            if not self._snapshots:  # prefix caching off: no snapshot pool
                return
            evicted, index = self._snapshots.popitem(last=False)
            self._free_snapshots.append(index)
            self._owned = {s: n for s, n in self._owned.items() if n != evicted}
        index = self._snapshots[name] = self._free_snapshots.pop()
        if not shared:
            self._owned[seq_id] = name
        slot = self._slot_of[seq_id]
        for layer, conv in self.conv.items():
            self.snap_conv[layer][index] = conv[slot]
            self.snap_recurrent[layer][index] = self.recurrent[layer][slot]

    def resume(self, seq_id: int, name: bytes) -> None:
        """Give a sequence admitted after a cached prefix a slot holding that prefix's state."""
        index = self._snapshots[name]
        self._snapshots.move_to_end(name)
        slot = self._slot_of.get(seq_id)
        if slot is None:
            slot = self._slot_of[seq_id] = self._take()
        for layer, conv in self.conv.items():
            conv[slot] = self.snap_conv[layer][index]
            self.recurrent[layer][slot] = self.snap_recurrent[layer][index]

    def batch(self, seq_ids: list[int], starts: list[int], lengths: list[int]) -> LinearBatch:
        """Slots for a step's sequences, in batch order; `starts[i]` tokens of sequence i are
        computed already and `lengths[i]` are new."""
        slots = []
        for seq_id, start in zip(seq_ids, starts, strict=True):
            slot = self._slot_of.get(seq_id)
            if slot is None:
                if start:
                    raise RuntimeError(f"sequence {seq_id} resumes at {start} without its state")
                slot = self._slot_of[seq_id] = self._take()
            if start == 0:
                self._reset(slot)
            slots.append(slot)
        offsets = [0, *itertools.accumulate(lengths)]
        decodes = [i for i, n in enumerate(lengths) if n == 1]
        return LinearBatch(
            states=self,
            decode_rows=self._tensor([offsets[i] for i in decodes]),
            decode_slots=self._tensor([slots[i] for i in decodes]),
            chunks=[
                (slice(offsets[i], offsets[i] + n), slots[i])
                for i, n in enumerate(lengths)
                if n > 1
            ],
        )

    def release(self, seq_id: int) -> None:
        """Hand back the slot of a finished, aborted or preempted sequence (if it holds one)."""
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)
        self._owned.pop(seq_id, None)  # its last snapshot stays for later sequences

    def _take(self) -> int:
        if not self._free:
            raise RuntimeError("more running sequences than linear-attention states")
        return self._free.pop()

    def _reset(self, slot: int) -> None:
        for tensor in itertools.chain(self.conv.values(), self.recurrent.values()):
            tensor[slot].zero_()

    def _tensor(self, values: list[int]) -> torch.Tensor | None:
        return torch.tensor(values, device=self.device) if values else None
