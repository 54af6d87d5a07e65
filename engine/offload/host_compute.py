"""Fiddler's choice for a missing expert (arXiv 2402.07033): compute it where its weights lie, on
the host, when that is quicker than copying it in. KTransformers and llama.cpp `--n-cpu-moe` place
experts on the CPU for good; here the choice is made per miss from two measurements, so a fast link
keeps copying and a slow one stops stalling.

Both sides are timed as they happen: the copy from each finished transfer, the host from each
expert it computes (its GEMMs alone), by how many tokens it had, in powers of two: one token reads
the weights once, a prefill's hundreds are a GEMM the host may be far slower at. Until a copy has
been timed every miss copies; a token count the host has no estimate for yet is probed by one miss
a layer (its first run is not kept: it pays one-time costs, a first GEMM can take 15x the next);
after that the quicker side wins. A host-computed expert is still copied in, as a miss would be but with
nobody waiting, when the link is idle: the cache keeps learning what is in use at the pace the link
allows (filling behind a busy link would only queue ever older copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.offload.transfer import Transfer, TransferEngine

MAX_BUCKET = 12  # token counts of 2048 and more share one estimate


def bucket(rows: int) -> int:
    """Token counts 1, 2-3, 4-7, ... share an estimate."""
    return min(max(rows, 1).bit_length(), MAX_BUCKET)


@dataclass
class HostCompute:
    smoothing: float = 0.2  # weight of the newest measurement in each moving average
    copy_s: float | None = None  # seconds one expert's copy takes on the link
    host_s: dict[int, float] = field(default_factory=dict)  # token-count bucket -> seconds
    warmed: set[int] = field(default_factory=set)  # buckets whose first (discarded) run is done
    computed: int = 0  # experts computed on the host so far
    untimed: list[Transfer] = field(default_factory=list)  # finished copies, not timed yet

    def prefer_host(self, rows: int, probing: set[int]) -> bool:
        """Whether a missing expert with `rows` tokens should run on the host rather than be
        copied in. `probing`: the buckets already being probed in this layer (one miss each)."""
        if self.copy_s is None:
            return False
        b = bucket(rows)
        if b not in self.host_s:
            if b in probing:
                return False
            probing.add(b)
            return True
        return self.host_s[b] < self.copy_s

    def time_copies(self, transfers: TransferEngine) -> None:
        """Record the finished copies whose duration is known by now (on CUDA: once their end
        event has been reached)."""
        waiting = []
        for transfer in self.untimed:
            seconds = transfers.measured_duration(transfer)
            if seconds is None:
                waiting.append(transfer)
            else:
                self.record_copy(seconds)
        self.untimed = waiting

    def record_copy(self, seconds: float) -> None:
        self.copy_s = self._average(self.copy_s, seconds)

    def record_host(self, seconds: float, rows: int) -> None:
        b = bucket(rows)
        if b in self.warmed:
            self.host_s[b] = self._average(self.host_s.get(b), seconds)
        self.warmed.add(b)
        self.computed += 1

    def _average(self, current: float | None, sample: float) -> float:
        return sample if current is None else current + self.smoothing * (sample - current)
