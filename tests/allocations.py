"""What a call allocates at its peak, above what was allocated before it: on the CPU from the
profiler's allocation events (what torch.cuda.max_memory_allocated says on a GPU), on CUDA from
the allocator. The memory profile's tests and benchmark measure real steps with it."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from engine import LLM, SamplingParams
from engine.memory import CudaMemory

Measure = Callable[[Callable[[], object]], int]


class AllocationEventsMissing(RuntimeError):
    """This torch's profiler does not expose allocation events (a private API)."""


def cpu_peak(run: Callable[[], object]) -> int:
    """The CPU allocator's running total at its highest, less its value before `run`. The total
    each event reports was read under the allocator's lock, so no ordering of events by their
    timestamps (which tie on a coarse clock, a free sorting before the allocation it followed)
    enters; a marker allocated first gives the total before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        marker = torch.empty(1)
        run()
    allocation = getattr(torch._C._profiler, "_ExtraFields_Allocation", None)
    results = getattr(prof.profiler, "kineto_results", None)
    if allocation is None or results is None:
        raise AllocationEventsMissing("no allocation events in this torch's profiler")
    totals, before, nodes = [], None, list(results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if isinstance(node.extra_fields, allocation):
            event = node.extra_fields
            totals.append(event.total_allocated)
            if event.ptr == marker.data_ptr() and event.alloc_size > 0:
                before = event.total_allocated  # with the marker, alive throughout
    if before is None:
        raise AllocationEventsMissing("the profiler did not report the marker's allocation")
    return max(totals) - before


def peak_of(device: torch.device) -> Measure:
    """The measure for `device`: the allocator's own on CUDA, the profiler's on the CPU."""
    if device.type == "cuda":
        return CudaMemory(device).peak_during
    return cpu_peak


class PeakProbe:
    """A memory probe (engine/memory.py) that measures the profile steps with `measure` and
    reports a device of `total` bytes with nothing else in use."""

    def __init__(self, measure: Measure, total: int) -> None:
        self.measure, self.total, self.activations = measure, total, 0

    def peak_during(self, run: Callable[[], None]) -> int:
        self.activations = self.measure(run)
        return self.activations

    def used_and_total(self) -> tuple[int, int]:
        return 0, self.total


@contextmanager
def measured_steps(llm: LLM, measure: Measure) -> Iterator[list[int]]:
    """Each step's peak while the block runs, in the list it yields."""
    runner, peaks = llm.engine.runner, []
    execute = runner.execute

    def measured(*args: object, **kwargs: object) -> object:
        result: list[object] = []
        peaks.append(measure(lambda: result.append(execute(*args, **kwargs))))
        return result[0]

    runner.execute = measured  # type: ignore[method-assign]
    try:
        yield peaks
    finally:
        runner.execute = execute  # type: ignore[method-assign]


def step_peaks(llm: LLM, measure: Measure, seed: int) -> list[int]:
    """Each step's peak while `llm` serves a mixed workload: prompts long, short and of one token,
    chunked beside decodes with long contexts, n > 1, sampled with logprobs and some prompt
    logprobs."""
    rng, context = random.Random(seed), llm.engine.max_model_len
    lengths = [rng.choice([1, 5, context // 6, context // 2, context - 20]) for _ in range(24)]
    prompts = [[rng.randrange(1, 384) for _ in range(n)] for n in lengths]
    params = [
        SamplingParams(
            max_tokens=8,
            temperature=0.8,
            top_p=0.9,
            seed=i,
            ignore_eos=True,
            logprobs=5,
            prompt_logprobs=3 if i % 4 == 0 else None,
            n=2 if i % 5 == 0 else 1,
        )
        for i in range(len(prompts))
    ]
    with measured_steps(llm, measure) as peaks:
        llm.generate(prompts, params)
    return peaks
