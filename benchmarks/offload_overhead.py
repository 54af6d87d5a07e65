"""Host time the offload runtime spends per MoE layer at real models' scale, against the layer's time.

The production ExpertCache and Prefetcher run on synthetic routing with the shapes of Mixtral-8x7B
(32 layers x 8 experts, top-2), Qwen3-30B-A3B (48 x 128, top-8) and DeepSeek-V3 (58 x 256, top-8),
on benchmarks/sim_link.py's simulated link and clock with replay.py's cost models. Per MoE layer it
times the cache's lookups (what `OffloadedExperts` calls) and the prefetcher's `on_route`, both pure
host work: on a GPU each adds to a layer's latency unless it hides under the kernels. Each token
takes its experts from a skewed per-layer popularity (Dirichlet 0.3); the predictor knows each
token's true path (perfect recall), so the prefetcher does the most work it can.

    python benchmarks/offload_overhead.py [--models qwen3-30b-a3b] [--batch-sizes 1 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import SCALES, Cost  # noqa: E402
from sim_link import SimLink  # noqa: E402

from engine.host_experts import HostExperts  # noqa: E402
from engine.offload.cache import ExpertCache  # noqa: E402
from engine.offload.horizon import HorizonController  # noqa: E402
from engine.offload.policy import make_policy  # noqa: E402
from engine.offload.prefetch import Prefetcher  # noqa: E402
from engine.offload.store import ExpertStore  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    experts: int
    top_k: int
    cost: Cost


FP8_DEEPSEEK_EXPERT = 3 * 7168 * 2048  # bytes: FP8 weights, as released
MODELS = {
    "mixtral-8x7b": Shape(32, 8, 2, SCALES["mixtral-8x7b-pcie4"]),
    "qwen3-30b-a3b": Shape(48, 128, 8, SCALES["qwen3-30b-a3b-pcie5"]),
    "deepseek-v3": Shape(
        58,
        256,
        8,
        Cost(
            "DeepSeek-V3 FP8, PCIe 5.0",
            FP8_DEEPSEEK_EXPERT,
            50e9,
            8 * FP8_DEEPSEEK_EXPERT / 3e12 + 50e-6,
        ),
    ),
}


class PathOracle:
    """Knows each token's true routing for the layers ahead (the `RoutingPredictor` interface)."""

    kind, context_window = "oracle", 0

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.routes = torch.empty(0, 0, 0, dtype=torch.long)  # [T, L, k] of the current step

    def path(self, token_ids: torch.Tensor, context: torch.Tensor) -> None:
        return None

    def ahead(self, index: int, residual, token_ids, topk_ids, horizon: int) -> torch.Tensor:  # noqa: ANN001
        ids = self.routes[:, index + 1 : index + 1 + horizon].transpose(0, 1)  # [h, T, k]
        probs = torch.zeros(*ids.shape[:2], self.num_experts)  # [h, T, E]
        return probs.scatter_(2, ids, 1.0 / ids.shape[-1])


def measure(shape: Shape, batch: int, ratio: float, policy: str, steps: int) -> dict[str, float]:
    torch.manual_seed(0)  # the popularity's draw
    g = torch.Generator().manual_seed(0)
    popularity = torch.distributions.Dirichlet(torch.full((shape.experts,), 0.3)).sample(
        (shape.layers,)
    )  # [L, E]
    host = HostExperts(
        {
            layer: {"w13": torch.zeros(shape.experts, 2, 1), "w2": torch.zeros(shape.experts, 1, 1)}
            for layer in range(shape.layers)
        }
    )
    link = SimLink(shape.cost.expert_bytes, shape.cost.link_bps)
    num_slots = int(ratio * shape.layers * shape.experts)
    cache = ExpertCache(
        ExpertStore(host, pin=False), num_slots, make_policy(policy), link, torch.device("cpu")
    )  # type: ignore[arg-type]
    oracle, prefetcher = PathOracle(shape.experts), None
    if policy == "expertflow":
        horizon = HorizonController(shape.layers - 1, shape.cost.expert_bytes)
        layers = tuple(range(shape.layers))
        prefetcher = Prefetcher(oracle, cache, layers, horizon, shape.top_k, lambda: link.now)  # type: ignore[arg-type]
    cache_s = prefetch_s = 0.0
    for _ in range(steps):
        oracle.routes = torch.stack(
            [
                torch.stack([torch.multinomial(p, shape.top_k, generator=g) for p in popularity])
                for _ in range(batch)
            ]
        )  # [T, L, k]
        cache.begin_step()
        if prefetcher is not None:
            prefetcher.begin_step(torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 0))
        for layer in range(shape.layers):
            topk = oracle.routes[:, layer]  # [T, k]
            start = time.perf_counter()
            if prefetcher is not None:
                prefetcher.on_route(layer, torch.zeros(batch, 1), torch.zeros(batch, 1), topk)
            routed = time.perf_counter()
            cache.release(cache.ensure(layer, topk.unique().tolist()))
            cache_s += time.perf_counter() - routed
            prefetch_s += routed - start
            link.now += shape.cost.layer_s
    n = steps * shape.layers
    s = cache.stats
    return {
        "slots": num_slots,
        "cache_us": 1e6 * cache_s / n,
        "prefetch_us": 1e6 * prefetch_s / n,
        "hit_rate": s.hits / max(1, s.hits + s.misses),
        "horizon": prefetcher.current_horizon if prefetcher else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("command: benchmarks/offload_overhead.py " + " ".join(sys.argv[1:]))
    print(
        "\n| model | batch | slots | system | hit rate | S | cache us/layer | prefetcher us/layer "
        "| host / modelled layer time |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name in args.models:
        shape = MODELS[name]
        for batch in args.batch_sizes:
            for policy in ("lru", "expertflow"):
                r = measure(shape, batch, args.ratio, policy, args.steps)
                system = "lru on demand" if policy == "lru" else "oracle + expertflow"
                host_us = r["cache_us"] + r["prefetch_us"]
                print(
                    f"| {name} | {batch} | {r['slots']} | {system} | {r['hit_rate']:.3f} | "
                    f"{r['horizon']} | {r['cache_us']:.0f} | {r['prefetch_us']:.0f} | "
                    f"{host_us / (1e6 * shape.cost.layer_s):.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
