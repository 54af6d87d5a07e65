"""Token scheduling, resident-first execution and cache-aware routing on the demo model, offloaded.

1. fcfs vs expertflow token scheduler at 16 and 64 concurrent sequences (steps run half of them, as
   EF-24 splits two pooled batches in two): distinct experts per step, hit rate, stall, tokens/s.
2. --resident-first on vs off: stall seconds.
3. --cache-aware-routing-margin 0 / 0.5 / 1 / 2: teacher-forced perplexity on held-out text, decoded
   token by token through the offloaded engine, and the misses it took.

    python benchmarks/scheduling.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offload import heldout_prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.attention import AttentionBatch  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402


def generate(model: str, prompts: list[list[int]], new_tokens: int, **flags: object) -> dict:
    llm = LLM(model=model, **flags)
    start = time.perf_counter()
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    )
    elapsed = time.perf_counter() - start
    stats = llm.offload_stats()
    stats["tokens_per_s"] = sum(len(o.token_ids) for o in outs) / elapsed
    stats["elapsed_s"] = elapsed
    stats["steps"] = len(llm.engine.offload.experts.activated_per_step)
    stats["layers"] = len(llm.engine.model_config.moe_layers)
    stats["expert_bytes"] = llm.engine.offload.store.expert_bytes
    selector = llm.engine.scheduler.selector
    stats["cluster_ms_per_step"] = (
        1e3 * selector.stats.cost_s / max(1, selector.stats.regrouped_steps) if selector else 0
    )
    llm.engine.offload.close()
    return stats


def perplexity(model: str, docs: list[list[int]], **flags: object) -> tuple[float, dict]:
    """Teacher-forced decode, one token per sequence per step, all docs side by side."""
    llm = LLM(model=model, max_num_seqs=len(docs), **flags)
    with torch.inference_mode():
        return _teacher_forced(llm, docs)


def _teacher_forced(llm: LLM, docs: list[list[int]]) -> tuple[float, dict]:
    engine = llm.engine
    length = min(len(d) for d in docs)
    for i in range(len(docs)):
        assert engine.blocks.grow(-1 - i, length)
    tables = [engine.blocks.table(-1 - i) for i in range(len(docs))]
    ids = torch.tensor([d[:length] for d in docs])  # [B, N]
    nll, count = 0.0, 0
    for pos in range(length - 1):
        batch = AttentionBatch.build(
            engine.kv, tables, [pos] * len(docs), [1] * len(docs), engine.device
        )
        engine.offload.experts.begin_step()
        hidden = engine.model(
            ids[:, pos], torch.full((len(docs),), pos), batch, engine.offload.experts
        )
        logp = torch.log_softmax(engine.model.logits(hidden), dim=-1)  # [B, V]
        nll -= logp.gather(1, ids[:, pos + 1, None]).sum().item()
        count += len(docs)
    stats = llm.offload_stats()
    stats["rerouted"] = engine.offload.experts.rerouted
    engine.offload.close()
    return math.exp(nll / count), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument(
        "--regime", type=float, default=1.0, help="expert copy time / layer compute time"
    )
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument(
        "--rpp",
        type=Path,
        default=Path("runs/predictors/rpp.safetensors"),
        help="rpp predictor whose routes the token scheduler groups by (EF-24); "
        "without it, each sequence's last observed route",
    )
    args = parser.parse_args()
    print(f"command: {' '.join(sys.argv)}\n")
    tokenizer = LLM(model=args.model).tokenizer
    prompts = heldout_prompts(tokenizer, max(args.concurrency), 32)
    base = generate(args.model, prompts[:8], args.new_tokens, max_num_seqs=8)
    layer_s = base["elapsed_s"] / base["steps"] / base["layers"]
    gbps = base["expert_bytes"] / (args.regime * layer_s) / 1e9
    offload = {"expert_cache_ratio": args.ratio, "link_gbps": gbps, "cache_policy": "lru"}
    print(
        f"ratio {args.ratio}, link {gbps:.3f} GB/s (copy = {args.regime:g}x T_l = {layer_s * 1e3:.2f} ms)\n"
    )

    print(
        "| concurrency | scheduler | experts/step | hit rate | stall s | tok/s | cluster ms/step |"
    )
    print("|---|---|---|---|---|---|---|")
    routes = {"predictor": "rpp", "predictor_path": str(args.rpp)} if args.rpp.exists() else {}
    print(f"routes for the token scheduler: {'rpp' if routes else 'last observed'}\n")
    for n in args.concurrency:
        for scheduler in ("fcfs", "expertflow"):
            s = generate(
                args.model,
                prompts[:n],
                args.new_tokens,
                max_num_seqs=n,
                token_scheduler=scheduler,
                token_group_size=n // 2,
                max_defer_steps=1,
                **offload,
                **routes,
            )
            print(
                f"| {n} | {scheduler} | {s['mean_activated_experts_per_step']:.1f} | {s['hit_rate']:.3f} | "
                f"{s['stall_seconds']:.3f} | {s['tokens_per_s']:.1f} | {s['cluster_ms_per_step']:.2f} |",
                flush=True,
            )

    print("\n| resident-first | predictor | stall s | hit rate | tok/s |\n|---|---|---|---|---|")
    for predictor in ("none", "pregate"):
        for resident_first in (False, True):
            s = generate(
                args.model,
                prompts[:8],
                args.new_tokens,
                max_num_seqs=8,
                resident_first=resident_first,
                predictor=predictor,
                **offload,
            )
            print(
                f"| {resident_first} | {predictor} | {s['stall_seconds']:.3f} | {s['hit_rate']:.3f} | "
                f"{s['tokens_per_s']:.1f} |",
                flush=True,
            )

    docs = heldout_prompts(tokenizer, 8, 96)
    print(
        "\n| margin | perplexity | vs margin 0 | misses | rerouted pairs |\n|---|---|---|---|---|"
    )
    reference = None
    for margin in args.margins:
        ppl, s = perplexity(
            args.model, docs, expert_cache_ratio=args.ratio, cache_aware_routing_margin=margin
        )
        reference = reference or ppl
        print(
            f"| {margin:g} | {ppl:.3f} | {100 * (ppl / reference - 1):+.2f}% | {s['misses']} | "
            f"{s['rerouted']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
