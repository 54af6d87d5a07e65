"""The link and clock of benchmarks/replay.py: TransferEngine's interface on a simulated clock, so
the production ExpertCache and Prefetcher run unchanged while copies take modelled time."""

from __future__ import annotations

import heapq
from collections import deque

from engine.offload.transfer import HIGH


class SimTransfer:
    def __init__(self, link: SimLink, priority: int, order: int) -> None:
        self.link, self.priority, self.order = link, priority, order
        self.submit_s, self.end_s = link.now, None
        self.nbytes, self.duration_s = link.expert_bytes, link.expert_bytes / link.bps

    def is_done(self) -> bool:
        self.link.advance(self.link.now)
        return self.end_s is not None and self.end_s <= self.link.now


class SimLink:
    """TransferEngine's interface on a simulated clock: one link, priority order, no preemption.
    The link catches up to the clock before its queue changes, so what it did does not depend on
    how often the cache happened to look at it. Copies wait in submission order until the link
    could start them, then in a heap by (priority, order): a poll costs O(log n), not O(n)."""

    def __init__(self, expert_bytes: int, bps: float) -> None:
        self.expert_bytes, self.bps = expert_bytes, bps
        self.now, self.free_at, self.stall_s = 0.0, 0.0, 0.0
        self.waiting: deque[SimTransfer] = deque()  # submitted, by submission time
        self.ready: list[tuple[int, int, SimTransfer]] = []  # startable; a promotion adds an entry
        self.submitted = 0

    def submit(self, pairs: list, priority: int) -> SimTransfer:  # noqa: ARG002
        self.advance(self.now)  # what the link started before this copy came does not wait on it
        self.submitted += 1
        transfer = SimTransfer(self, priority, self.submitted)
        self.waiting.append(transfer)
        return transfer

    def promote(self, transfer: SimTransfer) -> None:
        self.advance(self.now)  # a promotion moves nothing the link already started
        if transfer.end_s is None and transfer.priority != HIGH:
            transfer.priority = HIGH
            if transfer not in self.waiting:  # already in the heap: a second, earlier entry
                heapq.heappush(self.ready, (HIGH, transfer.order, transfer))

    def advance(self, until: float, target: SimTransfer | None = None) -> None:
        """Start queued copies in priority order while the link frees up before `until` (and,
        with a `target`, until that copy has started)."""
        while self.ready or self.waiting:
            start = self.free_at if self.ready else max(self.free_at, self.waiting[0].submit_s)
            if start > until and target is None:
                return
            while self.waiting and self.waiting[0].submit_s <= start:
                t = self.waiting.popleft()
                heapq.heappush(self.ready, (t.priority, t.order, t))
            nxt = heapq.heappop(self.ready)[2]
            if nxt.end_s is not None:
                continue  # the entry a promotion left behind
            nxt.end_s = self.free_at = start + nxt.duration_s
            if nxt is target:
                return

    def wait(self, transfer: SimTransfer) -> None:
        if transfer.end_s is None:
            self.advance(self.now, target=transfer)
        assert transfer.end_s is not None
        if transfer.end_s > self.now:
            self.stall_s += transfer.end_s - self.now
            self.now = transfer.end_s

    def measured_duration(self, transfer: SimTransfer) -> float:
        return transfer.duration_s

    def resolve_stalls(self) -> float:
        return self.stall_s
