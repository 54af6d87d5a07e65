"""Replay recorded routing traces through the real cache, policies and prefetcher under a cost model.

The production ExpertCache, HorizonController and Prefetcher run unchanged; only the link and the
clock are simulated: one host->device link of B bytes/s moves E_s-byte experts one at a time, misses
before prefetches (non-preemptive), and every MoE layer computes for T_l seconds. Stall = the time
compute waits on a copy. With the demo model's own E_s, link and measured T_l this predicts what
benchmarks/offload.py measures live (the cost model's check); with Mixtral-8x7B / Qwen3-30B-A3B
costs it tells what the same routing behaviour would stall at that scale. With `--cpu-expert-compute`
(the `host compute` rows) a miss may run on the host instead, at expert bytes / `--host-gbps` a
expert (decode on a CPU reads the weights once, memory-bound): the production HostCompute makes the
choice from the simulated copy times; the host's time counts as stall where it outlasts the layer's
wait on the link (no overlap with device compute is assumed).

    python benchmarks/replay.py --traces runs/predictors/traces.safetensors --batch 1 8
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from belady import belady_misses  # noqa: E402
from sim_link import SimLink  # noqa: E402
from stall_bound import stall_lower_bound  # noqa: E402

from engine.host_experts import HostExperts  # noqa: E402
from engine.offload.cache import ExpertCache  # noqa: E402
from engine.offload.horizon import HorizonController  # noqa: E402
from engine.offload.host_compute import HostCompute  # noqa: E402
from engine.offload.policy import make_policy  # noqa: E402
from engine.offload.predict.trace import TraceSet  # noqa: E402
from engine.offload.prefetch import Prefetcher  # noqa: E402
from engine.offload.store import ExpertStore  # noqa: E402


@dataclass(frozen=True)
class Cost:
    name: str
    expert_bytes: int
    link_bps: float
    layer_s: float


# Assumptions, stated: bf16 experts (but for the 4-bit row); effective PCIe 4.0 x16 ~25 GB/s,
# PCIe 5.0 x16 ~50 GB/s; batch-1 decode layer time on an H100 ~ reading the active experts at
# ~3 TB/s plus ~50 us of attention.
SCALES = {
    "mixtral-8x7b-pcie4": Cost(
        "Mixtral-8x7B, PCIe 4.0", 3 * 4096 * 14336 * 2, 25e9, 2 * 352e6 / 3e12 + 50e-6
    ),
    # A GPTQ/AWQ release kept 4-bit (kernels/int4.py): half a byte a value and 3 bytes (a 16-bit
    # scale, a zero point) a group of 128 = 67/128 of a byte; the kernel reads that much too
    "mixtral-8x7b-int4-pcie4": Cost(
        "Mixtral-8x7B 4-bit (GPTQ/AWQ), PCIe 4.0",
        3 * 4096 * 14336 * 67 // 128,
        25e9,
        2 * (3 * 4096 * 14336 * 67 / 128) / 3e12 + 50e-6,
    ),
    "qwen3-30b-a3b-pcie5": Cost(
        "Qwen3-30B-A3B, PCIe 5.0", 3 * 2048 * 768 * 2, 50e9, 8 * 9.4e6 / 3e12 + 50e-6
    ),
}


class TracePredictor:
    """Serves predictions recorded in the trace: the pre-gate rows, or the true future (oracle)."""

    context_window = 0

    def __init__(self, traces: TraceSet, oracle: bool) -> None:
        self.traces, self.oracle, self.rows = traces, oracle, torch.empty(0, dtype=torch.long)
        self.kind = "oracle" if oracle else "pregate"
        self.routes = traces.routes() if oracle else None

    def path(self, token_ids: torch.Tensor, context: torch.Tensor) -> None:
        return None

    def ahead(self, index: int, residual, token_ids, topk_ids, horizon: int) -> torch.Tensor:  # noqa: ANN001
        targets = range(index + 1, min(index + 1 + horizon, self.traces.meta.num_layers))
        if self.routes is not None:
            rows = [self.routes[self.rows, j] for j in targets]
        else:
            rows = [
                self.traces.pregate[self.rows, self.traces.pair_index(index, j)].float()
                for j in targets
            ]
        return (
            torch.stack(rows)
            if rows
            else torch.zeros(0, len(self.rows), self.traces.meta.num_experts)
        )


def stream_steps(traces: TraceSet, batch: int, steps: int) -> list[torch.Tensor]:
    """`batch` streams walk through the trace side by side, one token each per step."""
    stride = len(traces) // batch
    return [torch.tensor([b * stride + t for b in range(batch)]) for t in range(min(steps, stride))]


def wave_steps(traces: TraceSet, batch: int, prompt_len: int) -> list[torch.Tensor]:
    """The live benchmark's schedule: documents (prompt + generated tokens) in waves of `batch`;
    a wave prefills its prompts in one step, then decodes one token per document per step."""
    docs = [torch.nonzero(traces.doc_ids == d).flatten() for d in range(len(traces.meta.documents))]
    steps = []
    for first in range(0, len(docs), batch):
        wave = docs[first : first + batch]
        steps.append(torch.cat([rows[:prompt_len] for rows in wave]))
        steps += [torch.stack([rows[t] for rows in wave]) for t in range(prompt_len, len(wave[0]))]
    return steps


def replay(
    traces: TraceSet,
    cost: Cost,
    ratio: float,
    policy: str,
    predictor: str,
    steps: list[torch.Tensor],
    host_s: float | None = None,
) -> dict:
    """Run the trace rows of each step ([T] indices) through the real cache and prefetcher;
    `host_s`: seconds the host takes per expert, None for no host compute."""
    meta = traces.meta
    layers, experts = meta.moe_layers, meta.num_experts
    host = HostExperts(
        {
            layer: {"w13": torch.zeros(experts, 2, 1), "w2": torch.zeros(experts, 1, 1)}
            for layer in layers
        }
    )
    link = SimLink(cost.expert_bytes, cost.link_bps)
    cache = ExpertCache(
        ExpertStore(host, pin=False),
        max(1, int(ratio * len(layers) * experts)),
        make_policy(policy),
        link,
        torch.device("cpu"),
        None if host_s is None else HostCompute(),
    )  # type: ignore[arg-type]
    prefetcher = None
    if predictor != "none":
        pred = TracePredictor(traces, oracle=predictor == "oracle")
        horizon = HorizonController(len(layers) - 1, cost.expert_bytes)
        prefetcher = Prefetcher(pred, cache, layers, horizon, meta.top_k, clock=lambda: link.now)  # type: ignore[arg-type]
    lookups: list[tuple[int, list[int]]] = []
    for rows in steps:
        cache.begin_step()
        if prefetcher is not None:
            prefetcher.predictor.rows = rows  # type: ignore[attr-defined]
            prefetcher.begin_step(
                traces.token_ids[rows].long(), torch.zeros(len(rows), 0, dtype=torch.long)
            )
        for i, layer in enumerate(layers):
            topk = traces.topk_ids[rows, i].long()  # [T, k]
            if prefetcher is not None:
                prefetcher.on_route(
                    layer, torch.zeros(len(rows), 1), torch.zeros(len(rows), experts), topk
                )
            needed = topk.unique().tolist()
            lookups.append((layer, needed))
            tokens_of = torch.bincount(topk.flatten(), minlength=experts)[needed].tolist()
            on_host = cache.take_host(layer, needed, tokens_of)
            on_device = [e for e in needed if e not in on_host]
            link_wait = link.stall_s
            for start in range(0, len(on_device), cache.num_slots):  # stream when over capacity
                slots = cache.ensure(layer, on_device[start : start + cache.num_slots])
                cache.release(slots)
            if on_host:
                assert host_s is not None and cache.host is not None
                for expert in on_host:  # memory-bound: the same time whatever the token count
                    cache.host.record_host(host_s, tokens_of[needed.index(expert)])
                extra = max(0.0, len(on_host) * host_s - (link.stall_s - link_wait))
                link.stall_s += extra
                link.now += extra
            link.now += cost.layer_s
    s = cache.stats
    compute_s = len(steps) * len(layers) * cost.layer_s
    return {
        "lookups": s.hits + s.misses,
        "hit_rate": s.hits / max(1, s.hits + s.misses),
        "misses": s.misses,
        "belady": belady_misses(lookups, cache.num_slots, cache.warm_keys),
        "transfers": s.transfers,
        "host_computes": s.host_computes,
        "stall_s": link.stall_s,
        "stall_share": link.stall_s / (link.stall_s + compute_s),
        "horizon": prefetcher.current_horizon if prefetcher else 0,
        "lookup_sequence": lookups,
        "slots": cache.num_slots,
    }


def link_bound(result: dict, cost: Cost) -> float:
    """The least stall any system without host compute could have on `result`'s lookups, on this
    link and clock: the same for every row of a block, so computed once for it."""
    calls = result["lookup_sequence"]
    copy_s = cost.expert_bytes / cost.link_bps
    return stall_lower_bound(calls, [cost.layer_s] * len(calls), result["slots"], copy_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--local",
        nargs=3,
        type=float,
        metavar=("EXPERT_BYTES", "LINK_GBPS", "LAYER_MS"),
        help="also replay with the demo model's own costs, to check against benchmarks/offload.py",
    )
    parser.add_argument(
        "--scales", nargs="+", default=[*SCALES, "local"], help="cost models to replay"
    )
    parser.add_argument(
        "--host-gbps",
        type=float,
        default=50.0,
        help="host memory bandwidth for the host compute rows (an expert costs bytes / this)",
    )
    args = parser.parse_args()
    traces = TraceSet.load(args.traces)
    scales = dict(SCALES)
    if args.local:
        scales["local"] = Cost(
            "demo model, emulated link",
            int(args.local[0]),
            args.local[1] * 1e9,
            args.local[2] / 1e3,
        )
    print(f"command: {' '.join(sys.argv)}\n")
    systems = [  # name, policy, predictor, host compute
        ("lru on demand", "lru", "none", False),
        ("lfu on demand", "lfu", "none", False),
        ("lfu + host compute", "lfu", "none", True),
        ("pregate + expertflow", "expertflow", "pregate", False),
        ("pregate + expertflow + host compute", "expertflow", "pregate", True),
        ("oracle + expertflow", "expertflow", "oracle", False),
    ]
    for cost in (scales[name] for name in args.scales if name in scales):
        host_s = cost.expert_bytes / (args.host_gbps * 1e9)
        print(
            f"### {cost.name}: expert {cost.expert_bytes / 2**20:.1f} MiB, link {cost.link_bps / 1e9:g} GB/s, "
            f"copy {cost.expert_bytes / cost.link_bps * 1e3:.2f} ms, layer {cost.layer_s * 1e3:.3f} ms, "
            f"host {host_s * 1e3:.2f} ms an expert ({args.host_gbps:g} GB/s)\n"
        )
        print(
            "| batch | ratio | system | hit rate | misses | Belady | on host | stall s | stall share | S |\n"
            "|---|---|---|---|---|---|---|---|---|---|"
        )
        for batch in args.batch:
            for ratio in args.ratios:
                for name, policy, predictor, on_host in systems:
                    steps = stream_steps(traces, batch, args.steps)
                    r = replay(
                        traces, cost, ratio, policy, predictor, steps, host_s if on_host else None
                    )
                    print(
                        f"| {batch} | {ratio} | {name} | {r['hit_rate']:.3f} | {r['misses']} | {r['belady']} | "
                        f"{r['host_computes']} | {r['stall_s']:.3f} | {r['stall_share']:.3f} | {r['horizon']} |",
                        flush=True,
                    )
                print(  # the same lookups and compute in every row
                    f"| {batch} | {ratio} | link capacity bound (no host compute) | | | | "
                    f"| {link_bound(r, cost):.3f} | | |"
                )
        print()


if __name__ == "__main__":
    main()
