"""Fiddler's choice for a missing expert (arXiv 2402.07033): compute it where its weights lie, on
the host, when that is quicker than copying it in. KTransformers and llama.cpp `--n-cpu-moe` place
experts on the CPU for good; here the choice is made per miss from two measurements, so a fast link
keeps copying and a slow one stops stalling.

Both sides are timed as they happen: the copy from each finished transfer, the host from each expert
it computes (the activations' round trip included). Until a copy has been timed every miss copies;
then one miss probes the host; after that the quicker side wins. A host-computed expert is still
copied in, as a miss would be but with nobody waiting, when the link is idle: the cache keeps
learning what is in use at the pace the link allows (filling behind a busy link would only queue
ever older copies).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HostCompute:
    smoothing: float = 0.2  # weight of the newest measurement in each moving average
    copy_s: float | None = None  # seconds one expert's copy takes on the link
    host_s: float | None = None  # seconds the host takes to run one missing expert's tokens
    computed: int = 0  # experts computed on the host so far

    def prefer_host(self) -> bool:
        """Whether the next missing expert should run on the host rather than be copied in."""
        if self.copy_s is None:
            return False
        return self.host_s is None or self.host_s < self.copy_s

    def record_copy(self, seconds: float) -> None:
        self.copy_s = self._average(self.copy_s, seconds)

    def record_host(self, seconds: float) -> None:
        self.host_s = self._average(self.host_s, seconds)
        self.computed += 1

    def _average(self, current: float | None, sample: float) -> float:
        return sample if current is None else current + self.smoothing * (sample - current)
