"""ExpertCache: a fixed pool of device slots shared by all layers, a map (layer, expert) -> slot, and
an eviction policy. The kernel reads weights by slot id, so a hit costs nothing; a miss copies the
expert in at high priority and the compute path waits for it (the stall), unless `take_host` hands
it to the host to compute (`HostCompute`)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import torch

from engine.offload.cache_stats import CacheStats
from engine.offload.host_compute import HostCompute
from engine.offload.policy import EvictionPolicy, Key
from engine.offload.slots import SlotPool
from engine.offload.store import ExpertStore
from engine.offload.transfer import HIGH, LOW, Transfer, TransferEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        policy: EvictionPolicy,
        transfers: TransferEngine,
        device: torch.device,
        host: HostCompute | None = None,
    ) -> None:
        self.store, self.transfers, self.host, self.device = store, transfers, host, device
        self.in_flight: dict[int, Transfer] = {}  # slot -> copy not yet waited on
        self.resize(num_slots, policy)

    def resize(self, num_slots: int, policy: EvictionPolicy) -> None:
        """Start afresh with `num_slots` slots (at most every expert) and `policy`: the engine
        sizes the pool to the GPU's memory after a profile step has run on a provisional one."""
        if num_slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        for slot, transfer in list(self.in_flight.items()):  # nothing lands in a freed pool
            self._failing(slot, lambda: self.transfers.wait(transfer), waited=False)  # noqa: B023
        self.in_flight.clear()
        self.slots = SlotPool(self.store, 0, self.device)  # the old pool goes before the new one
        self.policy = policy
        self.num_slots = min(num_slots, self.store.num_total_experts)
        self.slots = SlotPool(self.store, self.num_slots, self.device)
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * self.num_slots
        self.empty = set(range(self.num_slots))  # slots holding no expert
        self.pins = [0] * self.num_slots
        self.protected: set[Key] = set()  # predicted within the horizon: evicted as a last resort
        self.prefetched: set[Key] = set()  # prefetched and not looked up yet
        self.stats = CacheStats()
        self.completed: deque[Transfer] = deque(maxlen=256)  # finished copies, to measure bandwidth
        self.tick = 0
        for slot, key in enumerate(self.warm_keys):  # fill the pool before serving
            self._place(key, slot)
            self.slots.load_now(key, slot)

    @property
    def warm_keys(self) -> list[Key]:
        """What `resize` loads, slot by slot: expert 0 of every layer, then expert 1, ... so each
        layer gets the same share (all of them at ratio 1). Belady's reference starts from it too."""
        layers, per_layer = self.store.layers, self.store.num_experts
        return [(layer, e) for e in range(per_layer) for layer in layers][: self.num_slots]

    def _place(self, key: Key, slot: int) -> None:
        old = self.key_of[slot]
        if old is not None:
            del self.slot_of[old]
            self.policy.on_evict(old)
            if old in self.prefetched:
                self.prefetched.discard(old)
                self.stats.prefetch_wasted += 1
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self.empty.discard(slot)
        self.policy.on_place(key)

    def _free_slot(self, for_prefetch: bool, keep: frozenset[Key] = frozenset()) -> int | None:
        """An empty slot, else the policy's victim among slots not pinned, written or in `keep`;
        experts predicted within the horizon go only to a miss with nothing else left. A pinned
        slot's copy is not asked after: if it failed, its layer's `wait_ready` copies it again."""

        def evictable(key: Key) -> bool:  # asks after a copy last: a query may cost a syscall
            slot = self.slot_of[key]
            return not self.pins[slot] and key not in keep and not self._writing(slot)

        if not self.empty:
            victim = self.policy.victim(lambda key: key not in self.protected and evictable(key))
            if victim is None and not for_prefetch:
                victim = self.policy.victim(evictable)
            if victim is not None and victim in self.slot_of:  # else its failed copy was dropped
                return self.slot_of[victim]
        return min(self.empty) if self.empty else None

    def _writing(self, slot: int) -> bool:
        transfer = self.in_flight.get(slot)
        if transfer is None:
            return False
        done = self._failing(slot, transfer.is_done, waited=self.pins[slot] > 0)
        if done is None:  # failed, with nobody waiting: dropped, the slot is empty
            return False
        if done:
            self._finished(self.in_flight.pop(slot))
        return not done

    def _ready(self, key: Key) -> bool:
        """Whether `key` is resident with its copy complete (not if that copy failed)."""
        slot = self.slot_of.get(key)
        return slot is not None and not self._writing(slot) and key in self.slot_of

    def _failing(self, slot: int, step: Callable[[], T], waited: bool) -> T | None:
        """Run a step that may report a failed copy into `slot`; if it does, the slot is emptied.
        A copy a layer waits on (`waited`) fails that layer's step; one nobody waits on (a
        prefetch, say) is dropped with a warning and None returned: no request fails for it."""
        try:
            return step()
        except RuntimeError as exc:
            self.in_flight.pop(slot, None)
            key = self.key_of[slot]
            if key is not None:
                del self.slot_of[key]
                self.policy.on_evict(key)
                self.prefetched.discard(key)
                self.protected.discard(key)
                self.key_of[slot] = None
                self.empty.add(slot)
            if waited:
                raise
            logger.warning("an expert copy nobody was waiting for failed; dropped: %s", exc)
            return None

    def _finished(self, transfer: Transfer) -> None:
        self.completed.append(transfer)
        if self.host is not None:  # timed once its duration is known (CUDA: when its event is)
            self.host.untimed.append(transfer)

    def begin_step(self) -> None:
        """Pins last one layer call; a step that failed mid-layer leaves none behind."""
        self.tick, self.pins = self.tick + 1, [0] * self.num_slots

    def ensure(self, layer: int, experts: list[int]) -> list[int]:
        """Make `experts` of `layer` resident and pin them; returns their slots. At most `num_slots`
        experts at once; the caller unpins with `release` when the layer's kernel has been queued."""
        slots, pending = self.acquire(layer, experts)
        for i in pending:
            self.wait_ready(slots[i])
        return slots

    def acquire(self, layer: int, experts: list[int]) -> tuple[list[int], list[int]]:
        """Pin slots for `experts` and start high-priority copies for the missing ones, without
        waiting; returns the slots and the indices of the experts whose copy is still under way."""
        slots, pending, keep = [], [], frozenset((layer, e) for e in experts)  # a miss evicts none
        for i, expert in enumerate(experts):
            key = (layer, expert)
            ready = self._ready(key)
            slot = self.slot_of.get(key)
            if not self._count_lookup(key, ready):
                if slot is None:
                    slot = self._load(key, HIGH, keep=keep)
                    assert slot is not None
                pending.append(i)
            self.pins[slot] += 1
            slots.append(slot)
        for i in pending:
            transfer = self.in_flight.get(slots[i])
            if transfer is not None:
                self.transfers.promote(transfer)
        return slots, pending

    def take_host(self, layer: int, experts: list[int], rows: list[int]) -> list[int]:
        """The experts of `layer` (with `rows` tokens each) not ready in a slot that the host
        should compute now (none without a HostCompute, or while copying is the quicker). Each
        is counted as a miss. One not resident yet is also copied in, if the link is idle, into
        a slot a prefetch could take (never one of this layer's `experts`) with nobody waiting:
        the cache still learns what is in use, at the pace the link allows."""
        if self.host is None:
            return []
        self.host.time_copies(self.transfers)
        layer_keys = frozenset((layer, e) for e in experts)
        taken: list[int] = []
        probing: set[int] = set()
        for expert, n in zip(experts, rows, strict=True):
            key = (layer, expert)
            if self._ready(key):
                continue
            if not self.host.prefer_host(n, probing):
                continue
            self._count_lookup(key, hit=False)
            self.stats.host_computes += 1
            if key not in self.slot_of and not self.copying():  # a busy link would only fall behind
                self._load(key, LOW, keep=layer_keys)
            taken.append(expert)
        return taken

    def _count_lookup(self, key: Key, hit: bool) -> bool:
        """Policy and statistics of one lookup; returns `hit`."""
        self.policy.on_access(key, self.tick)
        was_prefetched = key in self.prefetched
        if was_prefetched:
            self.prefetched.discard(key)
            self.stats.prefetch_used += 1
        if hit:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
            self.stats.prefetch_late += was_prefetched
        return hit

    def wait_ready(self, slot: int, retry: bool = True) -> None:
        """Block compute until the copy into `slot` has landed (the stall). A failed copy is made
        once more, at high priority (a prefetch may have met a passing shortage of memory)."""
        transfer, key = self.in_flight.pop(slot, None), self.key_of[slot]
        if transfer is None:
            return
        try:
            self._failing(slot, lambda: self.transfers.wait(transfer), waited=True)
        except RuntimeError:
            if not retry or key is None:
                raise
            logger.warning("the copy of expert %s failed; copying it again", key)
            self._copy(key, slot, HIGH)
            self.wait_ready(slot, retry=False)
            return
        self._finished(transfer)

    def resident_mask(self, layer: int, num_experts: int) -> list[bool]:
        """Which experts of `layer` are resident with their copy complete."""
        return [self._ready((layer, e)) for e in range(num_experts)]

    def copying(self) -> bool:
        """Whether any copy is queued or on the link now."""
        return any(self._writing(slot) for slot in list(self.in_flight))

    def outstanding_prefetches(self) -> int:
        """Prefetch copies queued or on the link now."""
        slots = [slot for slot in self.in_flight if self.key_of[slot] in self.prefetched]
        return sum(1 for slot in slots if self._writing(slot))

    def prefetch(self, layer: int, experts: list[int], limit: int | None = None) -> int:
        """Start low-priority copies of the experts not resident yet, into free or evictable slots
        only (never one pinned, in flight or predicted), at most `limit`; returns how many."""
        issued = 0
        for expert in experts:
            if limit is not None and issued >= limit:
                break
            key = (layer, expert)
            if key in self.slot_of:
                continue
            if self._load(key, LOW) is None:
                break
            self.prefetched.add(key)
            self.stats.prefetch_issued += 1
            issued += 1
        return issued

    def _load(self, key: Key, priority: int, keep: frozenset[Key] = frozenset()) -> int | None:
        """Copy `key` into a slot. A prefetch (LOW) takes a free or evictable slot, or none
        (None); a miss (HIGH) may also evict a predicted expert, then waits for a prefetch's
        slot not in `keep`, and fails only when every slot is pinned."""
        slot = self._free_slot(for_prefetch=priority == LOW, keep=keep)
        if slot is None and priority == HIGH:
            slot = self._drain_one_prefetch(keep)
        if slot is None:
            if priority == LOW:
                return None
            raise RuntimeError("every expert cache slot is pinned")
        return slot if self._copy(key, slot, priority) is not None else None

    def _copy(self, key: Key, slot: int, priority: int) -> Transfer | None:
        """Place `key` in `slot` and queue its copy; None for a prefetch that could not start
        (no staging memory, say)."""
        self._place(key, slot)
        copy = lambda: self.slots.copy_in(key, slot, self.transfers, priority)  # noqa: E731
        transfer = self._failing(slot, copy, waited=priority == HIGH)
        if transfer is not None:
            self.in_flight[slot] = transfer
            self.stats.transfers += 1
            self.stats.transfer_bytes += transfer.nbytes
        return transfer

    def _drain_one_prefetch(self, keep: frozenset[Key]) -> int | None:
        """Every unpinned slot is being written by a prefetch: wait for one not in `keep`, take it."""
        for slot, transfer in list(self.in_flight.items()):
            if not self.pins[slot] and self.key_of[slot] not in keep:
                wait = lambda: self.transfers.wait(transfer) is None  # noqa: B023, E731 (True: landed)
                if self._failing(slot, wait, waited=False):  # else dropped: the slot is empty
                    self._finished(self.in_flight.pop(slot))
                return self._free_slot(for_prefetch=False, keep=keep)
        return None

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.pins[slot] -= 1
