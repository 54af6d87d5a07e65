"""What a call allocates at its peak, above what was allocated before it: on the CPU from the
profiler's allocation events (what torch.cuda.max_memory_allocated says on a GPU), on CUDA from
the allocator. The memory profile's tests and benchmark measure real steps with it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from engine.memory import CudaMemory


class AllocationEventsMissing(RuntimeError):
    """This torch's profiler does not expose allocation events (a private API)."""


def cpu_peak(run: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    allocation = getattr(torch._C._profiler, "_ExtraFields_Allocation", None)
    results = getattr(prof.profiler, "kineto_results", None)
    if allocation is None or results is None:
        raise AllocationEventsMissing("no allocation events in this torch's profiler")
    events, nodes = [], list(results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if isinstance(node.extra_fields, allocation):
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def peak_of(device: torch.device) -> Callable[[Callable[[], object]], int]:
    """The measure for `device`: the allocator's own on CUDA, the profiler's on the CPU."""
    if device.type == "cuda":
        return CudaMemory(device).peak_during
    return cpu_peak


class PeakProbe:
    """A memory probe (engine/memory.py) that measures the profile steps with `measure` and
    reports a device of `total` bytes with nothing else in use."""

    def __init__(self, measure: Callable[[Callable[[], object]], int], total: int) -> None:
        self.measure, self.total, self.activations = measure, total, 0

    def peak_during(self, run: Callable[[], None]) -> int:
        self.activations = self.measure(run)
        return self.activations

    def used_and_total(self) -> tuple[int, int]:
        return 0, self.total
