"""Builds the offloading stack from the engine config and reports its statistics (DESIGN §6)."""

from __future__ import annotations

import logging
import math
import os

import torch

from engine.config import ConfigError, EngineConfig
from engine.host_experts import HostExperts
from engine.models.model import MoECausalLM
from engine.offload.cache import ExpertCache
from engine.offload.experts import OffloadedExperts
from engine.offload.horizon import HorizonController
from engine.offload.host_compute import HostCompute
from engine.offload.policy import make_policy
from engine.offload.predict import make_predictor
from engine.offload.prefetch import Prefetcher
from engine.offload.store import ExpertStore
from engine.offload.transfer import TransferEngine

logger = logging.getLogger(__name__)


def set_cpu_threads(threads: int | None, offloaded: bool) -> None:
    """--cpu-threads (the host's threads, on any device), or one core left to the expert link's
    thread when experts are offloaded on a CPU: torch's threads on every core stall at their
    barriers each time the link's thread wakes, and offloaded layers ran 2x slower for it
    (benchmarks/RESULTS.md, session 16)."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cores = cores or 1
        if not offloaded or cores < 2 or torch.get_num_threads() < cores:
            return
        threads = cores - 1
        logger.info(
            "%d torch threads: one core is the expert link's (--cpu-threads sets them)", threads
        )
    torch.set_num_threads(threads)


class OffloadRuntime:
    def __init__(
        self, config: EngineConfig, host: HostExperts, model: MoECausalLM, device: torch.device
    ) -> None:
        if config.cache_aware_routing_margin > 0 and model.cfg.router_weights_on_input:
            raise ConfigError(
                f"cache_aware_routing_margin is not supported for {model.cfg.family}: its router "
                "weighs each expert's input, so a swapped expert cannot be re-weighed"
            )
        packed = config.packed_slots(int4=host.int4_group is not None)
        self.store = ExpertStore(host, pin=device.type == "cuda", packed_slots=packed)
        total = self.store.num_total_experts
        ratio = 1.0 if config.expert_cache_ratio is None else config.expert_cache_ratio
        num_slots = config.expert_cache_size or max(1, math.floor(ratio * total))
        set_cpu_threads(config.cpu_threads, offloaded=device.type == "cpu" and num_slots < total)
        self.transfers = TransferEngine(device, config.link_gbps)
        try:
            self.cache = ExpertCache(
                self.store,
                num_slots,
                make_policy(config.cache_policy),
                self.transfers,
                device,
                HostCompute() if config.cpu_expert_compute else None,
            )
        except torch.OutOfMemoryError as exc:
            raise ConfigError(
                f"{num_slots} expert cache slots do not fit in GPU memory beside the model: "
                "lower --expert-cache-ratio or --expert-cache-size, or give neither to size the "
                "cache to --gpu-memory-utilization (it starts from one layer's experts)"
            ) from exc
        self.experts = OffloadedExperts(
            self.cache,
            self.store.num_experts,
            {i: model.model.layers[i].ffn.gate for i in self.store.layers},
            config.resident_first,
            config.cache_aware_routing_margin,
            model.cfg.gating,
        )
        self.prefetcher: Prefetcher | None = None
        predictor = make_predictor(config.predictor, model, config.predictor_path, config.model)
        if predictor is not None:
            fixed = None if str(config.prefetch_horizon) == "auto" else int(config.prefetch_horizon)
            horizon = HorizonController(len(self.store.layers) - 1, self.store.expert_bytes, fixed)
            self.prefetcher = Prefetcher(
                predictor,
                self.cache,
                self.store.layers,
                horizon,
                model.cfg.top_k,
                distinct=self.experts.distinct,
            )
        self.config = config

    def resize(self, num_slots: int) -> None:
        """The cache pool at `num_slots` slots, from empty (engine/memory.py sizes it)."""
        self.cache.resize(num_slots, make_policy(self.config.cache_policy))

    def log_summary(self) -> None:
        total = self.store.num_total_experts
        config = self.config
        logger.info(
            "expert cache: %d of %d experts resident (%.1f MiB of slots, %.1f%% of the decoded "
            "experts' device memory saved; %.1f MiB on the host%s), policy=%s, predictor=%s, "
            "link=%s",
            self.cache.num_slots,
            total,
            self.cache.slots.nbytes / 2**20,
            100 * (1 - self.cache.slots.nbytes / (total * self.store.decoded_expert_bytes)),
            self.store.total_bytes / 2**20,
            self._stored_label(),
            config.cache_policy,
            config.predictor,
            f"{config.link_gbps} GB/s emulated" if config.link_gbps else "native",
        )

    def _stored_label(self) -> str:
        """How the host holds the experts, where not in the compute dtype."""
        if self.store.fp8_block:
            return ", FP8"
        if self.store.int4_group:
            where = " in the slots too" if self.store.packed else "; slots decoded"
            return f", 4-bit integers in groups of {self.store.int4_group}{where}"
        if not self.store.mxfp4:
            return ""
        return ", MXFP4" + (" in the slots too" if self.store.packed else "; slots decoded")

    def stats(self) -> dict[str, float]:
        s = self.cache.stats
        lookups = s.hits + s.misses
        experts = self.experts
        return {
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hits / lookups if lookups else 0.0,
            "transfers": s.transfers,
            "transfer_bytes": s.transfer_bytes,
            "stall_seconds": self.transfers.resolve_stalls(),
            "prefetch_issued": s.prefetch_issued,
            "prefetch_used": s.prefetch_used,
            "host_computes": s.host_computes,
            "prefetch_horizon": self.prefetcher.current_horizon if self.prefetcher else 0,
            "predictor_recall": self.prefetcher.recall if self.prefetcher else 0.0,
            "resident_expert_bytes": self.cache.slots.nbytes,
            "total_expert_bytes": self.store.total_bytes,
            "expert_cache_slots": self.cache.num_slots,
            "mean_activated_experts_per_step": (
                experts.activated_total / experts.active_steps if experts.active_steps else 0.0
            ),
        }

    def close(self) -> None:
        self.transfers.close()
