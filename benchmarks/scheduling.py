"""Token scheduling, resident-first execution and cache-aware routing on the demo model, offloaded.

1. fcfs vs expertflow token scheduler at 16 and 64 concurrent sequences, each step running 1/k of
   them (k = 2: EF-24 splits two pooled batches in two): distinct experts per step (all steps, and
   decode steps only: the prefill step is the same for every scheduler), transfers, hit rate, stall,
   tokens/s. `oracle` is expertflow grouping by the routes the tokens will actually take (recorded
   by the fcfs pass; outputs do not depend on the schedule): what perfect prediction would give.
   For k = 2 and few sequences, every halving of each round is tried on those routes: the bound
   for any scheduler that runs each sequence once per two steps. max_defer_steps = 2(k - 1), the
   least under which the starvation bound never overrides a round of k groups.
2. --resident-first on vs off: stall seconds.
3. --cache-aware-routing-margin 0 / 0.5 / 1 / 2: teacher-forced perplexity on held-out text, decoded
   token by token through the offloaded engine, and the misses it took.

    python benchmarks/scheduling.py
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offload import demo_corpus, heldout_prompts  # noqa: E402
from teacher_forced import perplexity  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402
from scheduler.batching import ScheduledBatch  # noqa: E402

Routes = dict[tuple[int, ...], torch.Tensor]  # token ids up to a token -> its route [L, E]


def heldout_windows(tokenizer, count: int, length: int) -> list[list[int]]:  # noqa: ANN001
    """`count` distinct prompts from the held-out documents: each document's first window, then
    each one's second, and so on (there are fewer held-out documents than 64)."""
    docs = [tokenizer.encode(d) for d in demo_corpus().heldout]
    windows = [[d[i : i + length] for i in range(0, len(d) - length + 1, length)] for d in docs]
    ordered = [w[j] for j in range(max(map(len, windows))) for w in windows if j < len(w)]
    if len(ordered) < count:
        raise SystemExit(f"only {len(ordered)} held-out prompts of {length} tokens")
    return ordered[:count]


def record_routes(llm: LLM, into: Routes) -> None:
    """Keep the route each token actually took, keyed by the sequence's ids up to that token."""
    engine, record = llm.engine, llm.engine.routes.record

    def recording(seq_ids: list[int], rows: list[int]) -> None:
        record(seq_ids, rows)
        by_id = {s.seq_id: s for s in engine.scheduler.running}
        for seq_id in seq_ids:
            into[tuple(by_id[seq_id].token_ids)] = engine.routes.last_route[seq_id]

    engine.routes.record = recording  # type: ignore[method-assign]


def oracle_routes(llm: LLM, recorded: Routes) -> None:
    """Group by the routes the next tokens will take, recorded by an earlier run."""
    selector, running = llm.engine.scheduler.selector, llm.engine.scheduler.running
    assert selector is not None

    def routes_for(seq_ids: list[int]) -> torch.Tensor:
        by_id = {s.seq_id: s for s in running}
        return torch.stack([recorded[tuple(by_id[i].token_ids)] for i in seq_ids])  # [N, L, E]

    selector.routes_for = routes_for


def count_decode_steps(llm: LLM, into: list[bool]) -> None:
    """Append, per executed step, whether it only ran decodes (one new token per sequence)."""
    schedule = llm.engine.scheduler.schedule

    def counting() -> ScheduledBatch:
        batch = schedule()
        if batch.seqs:
            into.append(
                all(
                    n == 1 and s.num_computed_tokens == s.num_tokens - 1
                    for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
                )
            )
        return batch

    llm.engine.scheduler.schedule = counting  # type: ignore[method-assign]


def best_halving_cut(prompts: list[list[int]], outputs: list[list[int]], recorded: Routes) -> float:
    """Oracle bound for k = 2: for each round (every sequence's next decode), the halving of the
    sequences with the fewest distinct experts on the true routes, found by trying every halving;
    returned as the cut against FCFS halves (first half, second half)."""
    n = len(prompts)
    halves = [(0, *c) for c in itertools.combinations(range(1, n), n // 2 - 1)]
    member = torch.zeros(len(halves), n)  # [H, N] 1 for the first half
    for h, half in enumerate(halves):
        member[h, list(half)] = 1
    best = fcfs = 0
    for j in range(1, min(map(len, outputs))):
        routes = torch.stack(
            [
                recorded[tuple(p + o[:j])].flatten().float()
                for p, o in zip(prompts, outputs, strict=True)
            ]
        )  # [N, L*E] the route of each sequence's j-th decode input
        split = ((member @ routes) > 0).sum(1) + (((1 - member) @ routes) > 0).sum(1)  # [H]
        best += int(split.min())
        fcfs += int(split[0])  # halves[0] = the first n/2 in arrival order, as FCFS runs them
    return 1 - best / fcfs


def generate(
    model: str,
    prompts: list[list[int]],
    new_tokens: int,
    record: Routes | None = None,
    oracle: Routes | None = None,
    **flags: object,
) -> dict:
    llm = LLM(model=model, **flags)
    if record is not None:
        record_routes(llm, record)
    if oracle is not None:
        oracle_routes(llm, oracle)
    decode_only: list[bool] = []
    count_decode_steps(llm, decode_only)
    start = time.perf_counter()
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    )
    elapsed = time.perf_counter() - start
    stats = llm.offload_stats()
    stats["tokens_per_s"] = sum(len(o.token_ids) for o in outs) / elapsed
    stats["outputs"] = [o.token_ids for o in outs]
    stats["elapsed_s"] = elapsed
    activated = llm.engine.offload.experts.activated_per_step
    stats["steps"] = len(activated)
    decodes = [a for a, d in zip(activated, decode_only, strict=True) if d]
    stats["decode_experts_per_step"] = sum(decodes) / max(1, len(decodes))
    stats["layers"] = len(llm.engine.model_config.moe_layers)
    stats["expert_bytes"] = llm.engine.offload.store.expert_bytes
    selector = llm.engine.scheduler.selector
    stats["choose_ms_per_step"] = (
        1e3 * selector.stats.cost_s / max(1, selector.stats.selected_steps) if selector else 0
    )
    llm.engine.offload.close()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--splits", type=int, nargs="+", default=[2, 4], help="k: a step runs 1/k of the sequences"
    )
    parser.add_argument(
        "--exhaustive-up-to",
        type=int,
        default=16,
        help="for k = 2, try every halving of up to this many sequences (C(N-1, N/2-1) per round)",
    )
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
    torch.set_num_threads(1)  # the other core is the link's: see offload.py
    print(f"command: {' '.join(sys.argv)}\n")
    tokenizer = LLM(model=args.model).tokenizer
    prompts = heldout_windows(tokenizer, max(args.concurrency), 32)
    base = generate(args.model, prompts[:8], args.new_tokens, max_num_seqs=8)
    layer_s = base["elapsed_s"] / base["steps"] / base["layers"]
    gbps = base["expert_bytes"] / (args.regime * layer_s) / 1e9
    offload = {"expert_cache_ratio": args.ratio, "link_gbps": gbps, "cache_policy": "lru"}
    print(
        f"ratio {args.ratio}, link {gbps:.3f} GB/s (copy = {args.regime:g}x T_l = {layer_s * 1e3:.2f} ms)\n"
    )

    routes = {"predictor": "rpp", "predictor_path": str(args.rpp)} if args.rpp.exists() else {}
    print(f"routes for the token scheduler: {'rpp' if routes else 'last observed'}\n")
    print(
        "| concurrency | k | scheduler | experts/step | decode experts/step | vs fcfs | transfers "
        "| hit rate | stall s | tok/s | choose ms/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    exhaustive: list[str] = []
    for n in args.concurrency:
        for k in args.splits:
            recorded: Routes = {}
            fcfs = None
            for scheduler in ("fcfs", "expertflow", "oracle"):
                s = generate(
                    args.model,
                    prompts[:n],
                    args.new_tokens,
                    record=recorded if scheduler == "fcfs" else None,
                    oracle=recorded if scheduler == "oracle" else None,
                    max_num_seqs=n,
                    token_scheduler="fcfs" if scheduler == "fcfs" else "expertflow",
                    token_group_size=-(-n // k),
                    max_defer_steps=2 * (k - 1),
                    **offload,
                    **routes,
                )
                fcfs = fcfs or s
                change = s["decode_experts_per_step"] / fcfs["decode_experts_per_step"] - 1
                print(
                    f"| {n} | {k} | {scheduler} | {s['mean_activated_experts_per_step']:.1f} | "
                    f"{s['decode_experts_per_step']:.1f} | {change:+.1%} | {s['transfers']} | "
                    f"{s['hit_rate']:.3f} | {s['stall_seconds']:.3f} | {s['tokens_per_s']:.1f} | "
                    f"{s['choose_ms_per_step']:.2f} |",
                    flush=True,
                )
            if k == 2 and n <= args.exhaustive_up_to:
                cut = best_halving_cut(prompts[:n], fcfs["outputs"], recorded)
                exhaustive.append(f"{n} sequences: best halving {-cut:+.1%} vs fcfs halves")
    for line in exhaustive:
        print(f"exhaustive oracle, decode experts/step, {line}")

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
