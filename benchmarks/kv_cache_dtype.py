"""An FP8 KV cache (`--kv-cache-dtype`) on the demo model: the tokens it holds per GiB, what its
rounding costs in held-out loss and greedy agreement, and what reading it back costs in decode
speed on this CPU. Every dtype is scored on the same held-out prompts, read in chunks of 64
tokens so that later chunks attend over the cached (rounded) keys of the earlier ones; decode
speed alternates the dtypes, `--repeat` times, and keeps each one's best.

    .venv/bin/python benchmarks/kv_cache_dtype.py [--model models/expertflow-demo]
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offload import heldout_prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402

DTYPES = ("auto", "fp8", "fp8_e5m2")


def heldout_loss(llm: LLM, prompts: list[list[int]]) -> float:
    """Mean negative log-likelihood per token of the prompts."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate(prompts, params)
    scores = [e.logprob for o in outs for e in (o.prompt_logprobs or [])[1:] if e is not None]
    return -sum(scores) / len(scores)


def decode_seconds(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[float, list]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, [o.token_ids for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> int:
    """Greedy tokens before each sequence's first difference, summed."""
    return sum(
        next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), len(s))
        for s, t in zip(a, b, strict=True)
    )


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    llms = {
        d: LLM(model=args.model, kv_cache_dtype=d, max_num_batched_tokens=64, max_num_seqs=16)
        for d in DTYPES
    }
    prompts = heldout_prompts(llms["auto"].engine.tokenizer, args.prompts, args.prompt_tokens)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"model: {Path(args.model).name}; {len(prompts)} held-out prompts of {args.prompt_tokens} "
        f"tokens, scored in chunks of 64; decode: {args.new_tokens} new tokens each, 16 at once, "
        "greedy; float32 compute, 1 thread, best of "
        f"{args.repeat}"
    )
    seconds = dict.fromkeys(DTYPES, math.inf)
    outputs: dict[str, list] = {}
    for _ in range(args.repeat):
        for d, llm in llms.items():
            elapsed, outputs[d] = decode_seconds(llm, prompts, args.new_tokens)
            seconds[d] = min(seconds[d], elapsed)
    losses = {d: heldout_loss(llm, prompts) for d, llm in llms.items()}
    total = len(prompts) * args.new_tokens
    print(
        "| KV cache | bytes a token | tokens per GiB | held-out loss | perplexity | greedy agreement | decode tok/s | vs auto |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for d, llm in llms.items():
        kv = llm.engine.kv
        per_token = sum(t[0].numel() * t.element_size() for t in (*kv.k, *kv.v) if len(t))
        print(
            f"| {d} ({str(kv.cache_dtype).removeprefix('torch.')}) | {per_token} | "
            f"{2**30 // per_token:,} | {losses[d]:.4f} | x{math.exp(losses[d] - losses['auto']):.4f} | "
            f"{agreement(outputs['auto'], outputs[d])} of {total} | {total / seconds[d]:.1f} | "
            f"{seconds['auto'] / seconds[d]:.2f}x |"
        )


if __name__ == "__main__":
    main()
