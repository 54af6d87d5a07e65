"""Prefix caching on a multi-turn chat workload, with offloaded experts: what reusing KV saves.

Each of --conversations conversations starts with the same system prompt (--system-len tokens) and
a user message of its own; every turn appends the previous answer and a new user message, so turn t
resends everything before it, as chat clients do. All conversations' turn t run together (greedy,
--new-tokens each), turn after turn. The same workload runs with prefix caching off and on, in
alternation (--repeat), on the same expert cache settings; each side's best run is kept.

    .venv/bin/python benchmarks/prefix_cache.py [--expert-cache-ratio 0.5] [--link-gbps 0.25]

Prompts are held-out documents of the demo model's corpus (see benchmarks/offload.py).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload import demo_corpus  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402


def conversations(
    tokenizer: PreTrainedTokenizerBase, count: int, system_len: int, turns: int, user_len: int
) -> tuple[list[int], list[list[list[int]]]]:
    """(system prompt, [user messages per turn] per conversation) from held-out documents."""
    docs = [tokenizer.encode(d) for d in demo_corpus().heldout]
    long_docs = [d for d in docs if len(d) >= turns * user_len]
    system = max(docs, key=len)[:system_len]
    users = [
        [doc[t * user_len : (t + 1) * user_len] for t in range(turns)]
        for doc in long_docs[1 : count + 1]
    ]
    if len(users) < count:
        raise SystemExit(f"only {len(users)} held-out documents are long enough")
    return system, users


def run(llm: LLM, system: list[int], users: list[list[list[int]]], new_tokens: int) -> dict:
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    histories = [list(system) for _ in users]
    outputs, prompt_tokens, cached = [], 0, 0
    start = time.perf_counter()
    for turn in range(len(users[0])):
        prompts = [h + u[turn] for h, u in zip(histories, users, strict=True)]
        results = llm.generate(prompts, greedy)
        for h, p, r in zip(histories, prompts, results, strict=True):
            h[:] = p + r.token_ids
            outputs.append(r.token_ids)
            prompt_tokens += len(p)
            cached += r.num_cached_tokens
    elapsed = time.perf_counter() - start
    stats = llm.offload_stats()
    metrics = llm.engine.metrics
    labels = {"model_name": metrics.model_name}
    ttft_sum = metrics.registry.get_sample_value(
        "expertflow_time_to_first_token_seconds_sum", labels
    )
    ttft_count = metrics.registry.get_sample_value(
        "expertflow_time_to_first_token_seconds_count", labels
    )
    return {
        "elapsed_s": elapsed,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "ttft_ms": 1e3 * ttft_sum / ttft_count,
        "transfers": stats["transfers"],
        "stall_s": stats["stall_seconds"],
        "outputs": outputs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=160, help="shared system prompt (tokens)")
    ap.add_argument("--user-len", type=int, default=24, help="tokens per user message")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--expert-cache-ratio", type=float, default=0.5)
    ap.add_argument("--link-gbps", type=float, default=None, help="emulated link (CPU)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    flags = dict(
        model=args.model,
        max_num_seqs=args.conversations,
        expert_cache_ratio=args.expert_cache_ratio,
        link_gbps=args.link_gbps,
    )
    system, users = conversations(
        LLM(model=args.model).tokenizer,
        args.conversations,
        args.system_len,
        args.turns,
        args.user_len,
    )
    best: dict[bool, dict] = {}
    for _ in range(args.repeat):
        for caching in (False, True):  # a fresh engine each run: nothing cached from before
            result = run(
                LLM(**flags, enable_prefix_caching=caching), system, users, args.new_tokens
            )
            if caching not in best or result["elapsed_s"] < best[caching]["elapsed_s"]:
                best[caching] = result
    off, on = best[False], best[True]
    same = sum(a == b for a, b in zip(off["outputs"], on["outputs"], strict=True))
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"workload: {args.conversations} conversations x {args.turns} turns, system prompt "
        f"{len(system)} tokens, {args.user_len}-token user messages, {args.new_tokens} new tokens "
        f"per answer; expert cache ratio {args.expert_cache_ratio}, link "
        f"{args.link_gbps or 'native'} GB/s; best of {args.repeat}"
    )
    print(
        "| prefix caching | wall s | prompt tokens | cached | mean TTFT ms | transfers | stall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in (("off", off), ("on", on)):
        print(
            f"| {name} | {r['elapsed_s']:.2f} | {r['prompt_tokens']} | {r['cached_tokens']} | "
            f"{r['ttft_ms']:.1f} | {r['transfers']:.0f} | {r['stall_s']:.3f} |"
        )
    print(
        f"on / off: wall {on['elapsed_s'] / off['elapsed_s']:.2f}x, TTFT "
        f"{on['ttft_ms'] / off['ttft_ms']:.2f}x, transfers {on['transfers'] / off['transfers']:.2f}x"
    )
    print(f"identical greedy outputs: {same}/{len(off['outputs'])} answers")


if __name__ == "__main__":
    main()
