"""Host time the offload runtime spends per MoE layer at real models' scale, against the layer's time.

The production ExpertCache and Prefetcher run on synthetic routing with the shapes of Mixtral-8x7B
(32 layers x 8 experts, top-2), Qwen3-30B-A3B (48 x 128, top-8) and DeepSeek-V3 (58 x 256, top-8),
on benchmarks/sim_link.py's simulated link and clock with replay.py's cost models. Per MoE layer it
times the cache's lookups (what `OffloadedExperts` calls) and the prefetcher's `on_route`, both pure
host work: on a GPU each adds to a layer's latency unless it hides under the kernels. Each token
takes its experts from a skewed per-layer popularity (Dirichlet 0.3); the predictor knows each
token's true path (perfect recall), so the prefetcher does the most work it can.

`--live` also runs the whole engine (`LLM.generate`, greedy) on a random Qwen3-MoE checkpoint with
Qwen3-30B-A3B's 48 layers x 128 experts (top-8) but a hidden size of 32, so that compute is
nearly free and a step's time is mostly host work: all-resident against offloaded.

    python benchmarks/offload_overhead.py [--models qwen3-30b-a3b] [--batch-sizes 1 8] [--live]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import SCALES, Cost  # noqa: E402
from sim_link import SimLink  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
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


def live(batch: int, ratio: float, workdir: Path) -> None:
    """Milliseconds per layer and step of `LLM.generate` on a thin Qwen3-30B-A3B-shaped model."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("ef_conftest", root / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(conftest)  # type: ignore[union-attr]
    config = Qwen3MoeConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=128,
        num_experts_per_tok=8,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(workdir)
    conftest.build_tokenizer().save_pretrained(workdir)
    prompts = [[10 + (7 * i + 13 * j) % 300 for j in range(16)] for i in range(batch)]
    params, steps = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), 16
    systems = {
        "all resident": {},
        "lru on demand": {"expert_cache_ratio": ratio},
        "pregate + expertflow": {
            "expert_cache_ratio": ratio,
            "predictor": "pregate",
            "cache_policy": "expertflow",
        },
    }
    for system, flags in systems.items():
        llm = LLM(model=str(workdir), max_num_seqs=batch, enable_prefix_caching=False, **flags)
        llm.generate(prompts, params)  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            llm.generate(prompts, params)
            best = min(best, time.perf_counter() - start)
        s = llm.offload_stats() if flags else {"hit_rate": 1.0, "prefetch_horizon": 0}
        print(
            f"| {batch} | {system} | {s['hit_rate']:.3f} | {s['prefetch_horizon']} | "
            f"{1e3 * best / steps / config.num_hidden_layers:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--live", action="store_true", help="also time the whole engine")
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

    if args.live:
        print(
            "\nlive: LLM.generate on a random Qwen3-MoE, 48 layers x 128 experts, hidden 32\n\n"
            "| batch | system | hit rate | S | ms per layer and step |\n|---|---|---|---|---|"
        )
        for batch in args.batch_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                live(batch, args.ratio, Path(tmp))


if __name__ == "__main__":
    main()
