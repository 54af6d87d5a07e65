"""The link and clock of benchmarks/replay.py: TransferEngine's interface on a simulated clock, so
the production ExpertCache and Prefetcher run unchanged while copies take modelled time."""

from __future__ import annotations

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
    """TransferEngine's interface on a simulated clock: one link, priority order, no preemption."""

    def __init__(self, expert_bytes: int, bps: float) -> None:
        self.expert_bytes, self.bps = expert_bytes, bps
        self.now, self.free_at, self.stall_s = 0.0, 0.0, 0.0
        self.queue: list[SimTransfer] = []
        self.submitted = 0

    def submit(self, pairs: list, priority: int) -> SimTransfer:  # noqa: ARG002
        self.submitted += 1
        transfer = SimTransfer(self, priority, self.submitted)
        self.queue.append(transfer)
        return transfer

    def promote(self, transfer: SimTransfer) -> None:
        if transfer.end_s is None:
            transfer.priority = HIGH

    def advance(self, until: float, target: SimTransfer | None = None) -> None:
        """Start queued copies in priority order while the link frees up before `until`."""
        while self.queue:
            start = max(self.free_at, min(t.submit_s for t in self.queue))
            if start > until and target is None:
                return
            ready = [t for t in self.queue if t.submit_s <= start]
            nxt = min(ready, key=lambda t: (t.priority, t.order))
            self.queue.remove(nxt)
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
