"""EF-25's adaptive prefetch horizon: how many MoE layers ahead to fetch.

S = ceil(N_e * E_s / (B * T_l)): the layers of compute it takes to hide the copies of the N_e experts
a layer will need (E_s bytes each, B bytes/s link). Then feedback corrects the model: a streak of
layers that stalled on a late prefetch adds one layer, a streak of over-fetching layers removes one.
Clamped to [1, layers-1].

Whether a prefetch pays at all (`pays`): a right guess started d layers ahead saves min(d*T_l, C) of
a miss's wait (C = one copy's time); a wrong one holds the link for C, delaying the misses behind it.
With accuracy p, prefetch only when p * min(d*T_l, C) > (1 - p) * C. Where a copy is about a layer
(EF-25's setting) that is p > 1/2; where it is 20 layers and the target is 1 layer ahead, p > 0.95.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class HorizonController:
    max_horizon: int  # MoE layers - 1
    expert_bytes: int
    fixed: int | None = None  # `--prefetch-horizon N`; None = auto
    streak_len: int = 3
    ewma: float = 0.2
    bandwidth_bps: float | None = None
    layer_time_s: float | None = None
    adjust: int = 0
    stall_streak: int = 0
    overfetch_streak: int = 0

    def __post_init__(self) -> None:
        """A fixed horizon is clamped to the layers that follow, as auto's is, with a word: a
        --prefetch-horizon past them was silently the same as one reaching the last layer."""
        if self.fixed is not None and self.fixed > self.max_horizon:
            logger.warning(
                "prefetch_horizon=%d: the model has %d MoE layers, so prefetches look at most %d "
                "ahead",
                self.fixed,
                self.max_horizon + 1,
                self._clamp(self.fixed),
            )

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        if seconds > 0:
            self.bandwidth_bps = self._mix(self.bandwidth_bps, nbytes / seconds)

    def observe_layer_time(self, seconds: float) -> None:
        if seconds > 0:
            self.layer_time_s = self._mix(self.layer_time_s, seconds)

    def observe_layer(self, stalled: bool, overfetched: bool) -> None:
        """Feedback from one MoE layer: did compute wait on a copy; were prefetches wasted?"""
        self.stall_streak = self.stall_streak + 1 if stalled else 0
        self.overfetch_streak = self.overfetch_streak + 1 if overfetched and not stalled else 0
        if self.stall_streak >= self.streak_len:
            self.adjust, self.stall_streak = self.adjust + 1, 0
        elif self.overfetch_streak >= self.streak_len:
            self.adjust, self.overfetch_streak = self.adjust - 1, 0
        self.adjust = max(-self.max_horizon, min(self.max_horizon, self.adjust))

    def horizon(self, expected_experts: float) -> int:
        """S for layers expected to need `expected_experts` experts each. The prefetcher passes the
        distinct experts of the layer just routed, all of them, not DESIGN §4's count of sorted
        predicted probabilities up to a threshold: measured, it needs no threshold to tune, and
        a miss costs the same copy whichever expert it is."""
        if self.fixed is not None:
            return self._clamp(self.fixed)
        if not self.bandwidth_bps or not self.layer_time_s:
            base = 1  # nothing measured yet: one layer ahead
        else:
            transfer_s = expected_experts * self.expert_bytes / self.bandwidth_bps
            base = max(1, math.ceil(transfer_s / self.layer_time_s))
        return self._clamp(base + self.adjust)

    def copies_within(self, layers: int) -> int | None:
        """Copies the link can finish within `layers` layers of compute; None before anything
        is measured."""
        if not self.bandwidth_bps or not self.layer_time_s:
            return None
        return math.floor(layers * self.layer_time_s * self.bandwidth_bps / self.expert_bytes)

    def link_budget(self, layers: int) -> int | None:
        """Prefetches that may be outstanding for a layer `layers` ahead: what the link finishes
        by then (at least one); more only queue ahead of the misses to come."""
        copies = self.copies_within(layers)
        return None if copies is None else max(1, copies)

    def pays(self, layers: int, accuracy: float) -> bool:
        """Is a prefetch for `layers` layers ahead, right with probability `accuracy`, worth its
        copy? True before anything is measured."""
        if not self.bandwidth_bps or not self.layer_time_s:
            return True
        copy_s = self.expert_bytes / self.bandwidth_bps
        return accuracy * min(layers * self.layer_time_s, copy_s) > (1 - accuracy) * copy_s

    def _clamp(self, s: int) -> int:
        return max(1, min(self.max_horizon, s)) if self.max_horizon >= 1 else 0

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.ewma) * old + self.ewma * new
