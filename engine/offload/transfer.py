"""TransferEngine: host -> slot copies off the compute path.

CUDA: a copy stream for prefetches and a high-priority stream for misses; each transfer records an
event and the compute stream waits on it (`wait_event`), never the host. Stall is measured with timing
events: how long after the compute stream asked for the weights the copy completed.

CPU: one worker thread plays the link. Copies run one at a time, misses first; with `link_gbps` each
copy takes bytes / (G * 1e9) seconds, so policies compare on a CPU as they would over PCIe. Stall is
the wall time the compute thread blocks waiting.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

HIGH, LOW = 0, 1  # priorities: misses before prefetches


@dataclass(eq=False)
class Transfer:
    pairs: list[tuple[torch.Tensor, torch.Tensor]]  # (destination slot view, host source)
    nbytes: int
    priority: int
    then: Callable[[], None] | None = None  # runs after the copies, before the copy counts as done
    done: threading.Event = field(default_factory=threading.Event)
    cuda_event: torch.cuda.Event | None = None
    cuda_start: torch.cuda.Event | None = None
    started: bool = False
    error: Exception | None = None
    duration_s: float | None = None  # copy time once measured

    def is_done(self) -> bool:
        if self.cuda_event is not None:
            return self.cuda_event.query()
        if not self.done.is_set():  # first: the worker sets `error` before `done`
            return False
        if self.error is not None:
            raise RuntimeError(f"expert copy failed: {self.error!r}") from self.error
        return True


class TransferEngine:
    def __init__(self, device: torch.device, link_gbps: float | None = None) -> None:
        self.device, self.link_gbps = device, link_gbps
        self.cuda = device.type == "cuda"
        self._pending_stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.stall_s = 0.0
        if self.cuda:
            self.streams = {
                HIGH: torch.cuda.Stream(device, priority=-1),
                LOW: torch.cuda.Stream(device),
            }
            return
        self._link = CpuLink(link_gbps)
        # The link's thread holds no reference to this engine: once nobody uses it, it is
        # collected and this stops the thread (so does the interpreter's exit).
        self._close = weakref.finalize(self, self._link.close)

    def submit(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        priority: int,
        then: Callable[[], None] | None = None,
    ) -> Transfer:
        """Copy each (destination, host source) pair, then run `then` (FP8 experts dequantize into
        their slot there): on the copy stream, or on the worker within the link's time."""
        nbytes = sum(s.numel() * s.element_size() for _, s in pairs)
        transfer = Transfer(pairs, nbytes, priority, then)
        if self.cuda:
            stream = self.streams[priority]
            stream.wait_stream(
                torch.cuda.current_stream(self.device)
            )  # the slot's last reader is done
            with torch.cuda.stream(stream):
                transfer.cuda_start = torch.cuda.Event(enable_timing=True)
                transfer.cuda_start.record(stream)
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                    dst.record_stream(stream)  # a staging buffer outlives its copy
                if then is not None:
                    then()
                transfer.cuda_event = torch.cuda.Event(enable_timing=True)
                transfer.cuda_event.record(stream)
            transfer.pairs, transfer.then = [], None  # record_stream keeps the memory until done
            return transfer
        self._link.put(transfer, priority)
        return transfer

    def promote(self, transfer: Transfer) -> None:
        """A miss now waits on this queued prefetch: move it ahead of the other prefetches."""
        if not self.cuda and transfer.priority != HIGH:
            self._link.promote(transfer)

    def measured_duration(self, transfer: Transfer) -> float | None:
        """Seconds the copy took on the link, once it has completed (None before)."""
        if (
            transfer.duration_s is None
            and transfer.cuda_event is not None
            and transfer.cuda_event.query()
        ):
            assert transfer.cuda_start is not None
            transfer.duration_s = transfer.cuda_start.elapsed_time(transfer.cuda_event) / 1e3
        return transfer.duration_s

    def wait(self, transfer: Transfer) -> None:
        """Make the compute path wait for `transfer`; its stall is added to `stall_s`."""
        if self.cuda:
            assert transfer.cuda_event is not None
            compute = torch.cuda.current_stream(self.device)
            needed = torch.cuda.Event(enable_timing=True)
            needed.record(compute)  # `record()` alone: the current device's stream, maybe not ours
            compute.wait_event(transfer.cuda_event)
            self._pending_stalls.append((needed, transfer.cuda_event))
            return
        if transfer.done.is_set():
            if transfer.error is not None:
                raise RuntimeError(f"expert copy failed: {transfer.error!r}") from transfer.error
            return
        start = time.perf_counter()
        transfer.done.wait()
        self.stall_s += time.perf_counter() - start
        if transfer.error is not None:
            raise RuntimeError(f"expert copy failed: {transfer.error!r}") from transfer.error

    def resolve_stalls(self) -> float:
        """Total stall seconds so far (on CUDA, folds in the timing events that have completed)."""
        still = []
        for needed, done in self._pending_stalls:
            if done.query() and needed.query():
                self.stall_s += max(0.0, needed.elapsed_time(done) / 1e3)
            else:
                still.append((needed, done))
        self._pending_stalls = still
        return self.stall_s

    def close(self) -> None:
        """Stop the CPU link: copies still queued fail (their waiters raise), none hangs."""
        if not self.cuda:
            self._close()


class CpuLink:
    """The CPU's link: one worker thread copying queued transfers one at a time, misses first; with
    `link_gbps`, each copy takes bytes / (G * 1e9) seconds."""

    def __init__(self, link_gbps: float | None) -> None:
        self.link_gbps = link_gbps
        self._queue: list[tuple[int, int, Transfer]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="expertflow-link", daemon=True)
        self._thread.start()

    def put(self, transfer: Transfer, priority: int) -> None:
        with self._cv:
            if self._closed:
                transfer.error = RuntimeError("the expert link was closed")
                transfer.done.set()
                return
            heapq.heappush(self._queue, (priority, next(self._order), transfer))
            self._cv.notify()

    def promote(self, transfer: Transfer) -> None:
        with self._cv:
            if not transfer.started:
                transfer.priority = HIGH
                heapq.heappush(self._queue, (HIGH, next(self._order), transfer))
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            queued, self._queue = self._queue, []
            self._cv.notify()
        for _, _, transfer in queued:
            if not transfer.started:
                transfer.started = True
                transfer.error = RuntimeError("the expert link was closed")
                transfer.done.set()
        if threading.current_thread() is not self._thread:  # a collection may run anywhere
            self._thread.join(timeout=5)  # out of torch before the interpreter goes

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                _, _, transfer = heapq.heappop(self._queue)
                if transfer.started:  # a promoted duplicate entry
                    continue
                transfer.started = True
            start = time.perf_counter()
            try:
                with torch.inference_mode():  # slots made under inference mode change only there
                    for dst, src in transfer.pairs:
                        dst.copy_(src)
                    if transfer.then is not None:
                        transfer.then()
            except Exception as exc:  # surface it to the waiting compute thread, keep the link up
                transfer.error = exc
            if self.link_gbps:
                remaining = start + transfer.nbytes / (self.link_gbps * 1e9) - time.perf_counter()
                if remaining > 0:
                    time.sleep(remaining)
            transfer.duration_s = time.perf_counter() - start
            transfer.pairs, transfer.then = [], None  # kept for its timing: not its buffers
            transfer.done.set()
