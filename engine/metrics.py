"""Prometheus collectors of the engine, one registry per engine, names as in DESIGN §6."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.outputs import RequestTiming

# vLLM's bucket edges, so dashboards built for vLLM read ours the same way.
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ACTIVATED_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# fmt: on
HIT_WINDOW = 64
# What the engine sets: the detokenizer's stop/length, an abort's abort (vLLM's too).
FINISH_REASONS = ("stop", "length", "abort")
PREFIX = "expertflow_"


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                PREFIX + name, doc, labels, buckets=buckets, registry=self.registry
            ).labels(model_name)

        self.model_name = model_name
        self.running = gauge("num_requests_running", "Requests with sequences in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks in use")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.prefix_queries = counter(
            "prefix_cache_queries", "Tokens of admitted sequences looked up in the prefix cache"
        )
        self.prefix_hits = counter(
            "prefix_cache_hits", "Tokens whose KV blocks the prefix cache already held"
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        for reason in FINISH_REASONS:  # at 0 from the start, so rate() sees each first finish
            self.success.labels(model_name, reason)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", TTFT_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time between output tokens of a request",
            TPOT_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish", E2E_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled step", E2E_BUCKETS
        )
        self.preemptions = counter(
            "num_preemptions", "Sequences preempted for KV blocks (freed, to be recomputed)"
        )
        self.offload_counters = {
            "hits": counter(
                "expert_cache_hits", "Expert cache lookups that found the expert resident"
            ),
            "misses": counter(
                "expert_cache_misses", "Expert cache lookups that did not find the expert ready"
            ),
            "transfers": counter("expert_transfers", "Host-to-device expert copies"),
            "transfer_bytes": counter(
                "expert_transfer_bytes", "Bytes of host-to-device expert copies"
            ),
            "stall_seconds": counter(
                "expert_stall_seconds", "Time compute waited for expert copies"
            ),
            "prefetch_issued": counter("prefetch_issued", "Expert prefetches issued"),
            "prefetch_used": counter("prefetch_used", "Prefetched experts used before eviction"),
            "host_computes": counter(
                "expert_host_computes", "Missing experts run on the host instead of copied in"
            ),
        }
        self._offload_seen = dict.fromkeys(self.offload_counters, 0.0)
        self.hit_ratio = gauge(
            "expert_cache_hit_ratio", f"Hit ratio over the last {HIT_WINDOW} steps"
        )
        # cumulative (hits, misses) after each step: HIT_WINDOW steps lie between HIT_WINDOW + 1
        self._window: deque[tuple[float, float]] = deque(maxlen=HIT_WINDOW + 1)
        self.resident_bytes = gauge(
            "expert_cache_resident_bytes", "Device bytes held by expert slots"
        )
        self.slots = gauge("expert_cache_slots", "Expert cache slots")
        self.horizon = gauge(
            "prefetch_horizon", "MoE layers the prefetcher looks ahead (0: no predictor)"
        )
        self.recall = gauge(
            "predictor_recall", "Mean recall@k of the one-layer-ahead routing prediction"
        )
        self.activated = histogram(
            "activated_experts_per_step",
            "Distinct experts activated per step, summed over layers",
            ACTIVATED_BUCKETS,
        )

    def record_step(
        self,
        num_running: int,
        num_waiting: int,
        kv_usage: float,
        new_prompt_tokens: int,
        new_generation_tokens: int,
    ) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)
        self.kv_usage.set(kv_usage)
        self.prompt_tokens.inc(new_prompt_tokens)
        self.generation_tokens.inc(new_generation_tokens)

    def record_schedule(self, num_preempted: int, queued_s: list[float]) -> None:
        """One step's preemptions, and how long its newly scheduled requests waited."""
        self.preemptions.inc(num_preempted)
        for wait in queued_s:
            self.queue_time.observe(wait)

    def record_prefix_cache(self, num_queried: int, num_hits: int) -> None:
        self.prefix_queries.inc(num_queried)
        self.prefix_hits.inc(num_hits)

    def record_first_token(self, timing: RequestTiming) -> None:
        assert timing.first_token_s is not None
        self.ttft.observe(timing.first_token_s - timing.arrival_s)

    def record_finished(
        self, timing: RequestTiming, finish_reason: str, num_output_tokens: int
    ) -> None:
        """Called once per finished request; `finish_reason` is the first choice's (stop/length/abort)."""
        assert timing.finished_s is not None
        self.success.labels(self.model_name, finish_reason).inc()
        self.e2e.observe(timing.finished_s - timing.arrival_s)
        if (
            timing.first_token_s is not None
            and timing.last_token_s is not None
            and num_output_tokens > 1
        ):
            self.tpot.observe(
                (timing.last_token_s - timing.first_token_s) / (num_output_tokens - 1)
            )

    def record_offload(self, stats: dict[str, float], activated_experts: int | None) -> None:
        """Folds one step's cumulative offload stats into the counters (by delta) and gauges."""
        for name, counter in self.offload_counters.items():
            delta = stats[name] - self._offload_seen[name]
            if delta > 0:
                counter.inc(delta)
            self._offload_seen[name] = stats[name]
        self._window.append((stats["hits"], stats["misses"]))
        (h0, m0), (h1, m1) = self._window[0], self._window[-1]
        if len(self._window) > 1 and (h1 - h0) + (m1 - m0) > 0:
            self.hit_ratio.set((h1 - h0) / ((h1 - h0) + (m1 - m0)))
        elif stats["hits"] + stats["misses"]:
            self.hit_ratio.set(stats["hit_rate"])
        self.resident_bytes.set(stats["resident_expert_bytes"])
        self.slots.set(stats["expert_cache_slots"])
        self.horizon.set(stats["prefetch_horizon"])
        self.recall.set(stats["predictor_recall"])
        if activated_experts is not None:
            self.activated.observe(activated_experts)
