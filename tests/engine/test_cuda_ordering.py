"""The CUDA ordering of the offloading runtime, checked on the CPU. torch.cuda's streams and events
are replaced by fakes that keep vector clocks (stream order, `wait_stream`, `wait_event`, and an
event the host saw complete); every kernel's read of a slot must then happen after the copy that
filled it, and every copy into a slot after the kernels that read it before. Events complete at
random, so both ways a copy is known to have landed (queried done, or waited on) are exercised."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine.offload.cache import ExpertCache
from engine.offload.experts import OffloadedExperts
from engine.offload.host_compute import HostCompute
from engine.offload.policy import LRUPolicy
from engine.offload.slots import SlotPool
from engine.offload.transfer import TransferEngine
from tests.engine.test_expert_cache import make_store

Clock = dict[str, int]


def join(a: Clock, b: Clock) -> Clock:
    return {s: max(a.get(s, 0), b.get(s, 0)) for s in a.keys() | b.keys()}


@dataclass
class Op:
    kind: str  # "read" (a kernel) or "write" (a copy)
    slot: int
    stream: str
    clock: Clock

    def before(self, other: Op) -> bool:
        return self.clock[self.stream] <= other.clock.get(self.stream, 0)


@dataclass
class Sim:
    rng: random.Random
    host: Clock = field(default_factory=dict)  # what the host has seen complete
    ops: list[Op] = field(default_factory=list)
    completed: Clock = field(default_factory=dict)  # stream -> how far it has run
    current: dict[int, FakeStream] = field(default_factory=dict)  # device -> current stream
    device: int = 0  # the current device

    def stream(self, device: int | None = None) -> FakeStream:
        index = self.device if device is None else device
        return self.current.setdefault(index, FakeStream(self, f"compute:{index}", index))

    def op(self, stream: FakeStream, kind: str, slot: int) -> None:
        stream.tick()
        op = Op(kind, slot, stream.name, dict(stream.clock))
        for earlier in (o for o in self.ops if o.slot == slot):
            if kind == "write" or earlier.kind == "write":  # RAW, WAR, WAW
                assert earlier.before(op), f"{op.kind} of slot {slot} races {earlier.kind}"
        self.ops.append(op)


class FakeStream:
    count = 0

    def __init__(self, sim: Sim, name: str | None = None, device: int = 0) -> None:
        FakeStream.count += 1
        self.sim, self.device = sim, device
        self.name = name or f"copy{FakeStream.count}"
        self.clock: Clock = {self.name: 0}

    def tick(self) -> None:
        self.clock = join(self.clock, self.sim.host)
        self.clock[self.name] += 1

    def wait_stream(self, other: FakeStream) -> None:
        self.clock = join(self.clock, other.clock)

    def wait_event(self, event: FakeEvent) -> None:
        assert event.clock is not None, "waits on an event never recorded"
        assert event.device == self.device, "waits on another device's event"
        self.clock = join(self.clock, event.clock)


class FakeEvent:
    sim: Sim

    def __init__(self, enable_timing: bool = False) -> None:
        self.clock: Clock | None = None
        self.device, self.stream = 0, ""

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.sim.stream()
        stream.tick()
        self.clock, self.device, self.stream = dict(stream.clock), stream.device, stream.name

    @property
    def done(self) -> bool:
        return (
            self.clock is not None
            and self.sim.completed.get(self.stream, 0) >= self.clock[self.stream]
        )

    def query(self) -> bool:
        assert self.clock is not None
        if not self.done and self.sim.rng.random() < 0.3:  # its stream ran this far
            self.sim.completed[self.stream] = self.clock[self.stream]
        if self.done:  # the host saw it: whatever it queues next comes after
            self.sim.host = join(self.sim.host, self.clock)
        return self.done

    def elapsed_time(self, other: FakeEvent) -> float:
        assert self.done and other.done, "elapsed_time of an event not yet complete"
        assert self.device == other.device, "elapsed_time across devices"
        return 1.0


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sim]:
    sim = Sim(random.Random(0))
    FakeEvent.sim = sim

    @contextlib.contextmanager
    def use(stream: FakeStream) -> Iterator[None]:
        before, sim.current[stream.device] = sim.stream(stream.device), stream
        try:
            yield
        finally:
            sim.current[stream.device] = before

    def device_of(device: torch.device | None) -> int | None:
        return None if device is None or device.index is None else device.index

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(
        torch.cuda, "Stream", lambda device=None, priority=0: FakeStream(sim, None, 0)
    )
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: sim.stream(device_of(d)))
    monkeypatch.setattr(torch.cuda, "stream", use)
    yield sim


def watch(sim: Sim, cache: ExpertCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Log each copy into a slot (on its stream) and each kernel's slots (on the compute one)."""
    slot_at = {
        t[slot].data_ptr(): slot for t in cache.slots.parts.values() for slot in range(len(t))
    }
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda t, s: sim.op(s, "write", slot_at[t.data_ptr()])
    )
    run = SlotPool.run

    def reading(
        pool: SlotPool, hidden: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, *a: Any, **k: Any
    ) -> torch.Tensor:
        for slot in sorted(set(ids.flatten().tolist())):
            sim.op(sim.stream(), "read", slot)
        return run(pool, hidden, w, ids, *a, **k)

    monkeypatch.setattr(SlotPool, "run", reading)


@pytest.mark.parametrize("resident_first", [False, True])
@pytest.mark.parametrize("host", [False, True])
def test_no_kernel_reads_a_slot_a_copy_may_still_be_writing(
    sim: Sim, monkeypatch: pytest.MonkeyPatch, resident_first: bool, host: bool
) -> None:
    layers, experts, slots = 3, 6, 4
    store = make_store(layers=layers, experts=experts)
    transfers = TransferEngine(torch.device("cuda"))
    helper = HostCompute(copy_s=1.0) if host else None
    cache = ExpertCache(store, slots, LRUPolicy(), transfers, torch.device("cpu"), helper)
    watch(sim, cache, monkeypatch)
    moe = OffloadedExperts(cache, experts, {}, resident_first=resident_first)
    rng = random.Random(1)
    for _ in range(40):
        moe.begin_step()
        tokens = rng.choice([1, 2, 5])
        for layer in range(layers):
            if rng.random() < 0.5:  # the prefetcher, for the layer ahead
                cache.prefetch((layer + 1) % layers, rng.sample(range(experts), 2))
            ids = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
            weights = torch.rand(tokens, 2)
            hidden = torch.randn(tokens, 8)
            moe(layer, hidden, ids, weights, torch.zeros(tokens, experts))
    kinds = {(op.kind, op.stream.startswith("copy")) for op in sim.ops}
    assert kinds == {("read", False), ("write", True)}
    assert transfers.resolve_stalls() >= 0


def test_a_stall_is_timed_on_the_stream_that_waits(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On cuda:1 while the current device is 0, the event marking when compute needed the copy
    is recorded on cuda:1's compute stream, the one that waits (else elapsed_time fails)."""
    transfers = TransferEngine(torch.device("cuda:1"))
    transfers.streams = {p: FakeStream(sim, None, 1) for p in transfers.streams}
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: None)
    transfer = transfers.submit([(torch.zeros(4), torch.ones(4))], priority=0)
    transfers.wait(transfer)
    (needed, done), *_ = transfers._pending_stalls
    assert needed.device == done.device == 1


class ReadBacks(TorchFunctionMode):
    """Logs each read-back to the host (a sync on a GPU) outside the kernel (the torch path's
    own read-backs are not the Triton kernel's)."""

    SYNCS = (torch.Tensor.nonzero, torch.nonzero, torch.Tensor.tolist, torch.Tensor.item)

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log, self.in_kernel = log, False

    def __torch_function__(
        self, func: Callable[..., Any], types: object, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in self.SYNCS and not self.in_kernel:
            self.log.append("read-back")
        return func(*args, **(kwargs or {}))


def test_resident_first_reads_nothing_back_once_it_waits_for_a_copy() -> None:
    """On a GPU a read-back after `wait_ready` holds the host until that copy lands, and the next
    missing expert's kernel is queued only then: each missing expert's tokens are found first."""
    store = make_store(layers=2, experts=4)
    cache = ExpertCache(
        store, 4, LRUPolicy(), TransferEngine(torch.device("cpu")), torch.device("cpu")
    )
    moe = OffloadedExperts(cache, 4, {}, resident_first=True)
    log: list[str] = []
    wait_ready = cache.wait_ready
    cache.wait_ready = lambda slot, retry=True: (log.append("wait"), wait_ready(slot, retry))[1]
    moe.begin_step()
    ids = torch.tensor([[0, 2], [1, 3], [2, 0]])  # 0 and 1 resident (warm), 2 and 3 missing
    mode, run = ReadBacks(log), cache.slots.run

    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        mode.in_kernel = True
        try:
            return run(*args, **kwargs)
        finally:
            mode.in_kernel = False

    cache.slots.run = kernel
    with mode:
        out = moe(0, torch.randn(3, 8), ids, torch.rand(3, 2), torch.zeros(3, 4))
    assert log.count("wait") == 2 and "read-back" not in log[log.index("wait") :]
    assert out.shape == (3, 8)
