"""Check the replay cost model against live runs that took the same routing.

Live: the demo model offloaded with the emulated link, on benchmarks/offload.py's held-out prompts,
for on-demand lru and lfu and for pre-gate + expertflow (without resident-first, which the replay
does not model). Replay: the exact token streams those runs processed (prompts + generated tokens)
are traced, then replayed through the same cache, policies and prefetcher on a simulated link with
the live costs (expert bytes, link bandwidth, a mean per-layer compute time), in the live schedule
(a wave of `batch` prompts prefilled in one step, then one token each per step). The layer time is
given two ways: the all-resident run's (what benchmarks/replay.py assumes at scale), and the
system's own, (elapsed - stall) / layers computed: a predictor's work lengthens every layer and so
hides more of each copy. Where replay and live agree, the replay's figures at Mixtral / Qwen3 scale
rest on a checked model.

    python benchmarks/replay_check.py [--batch-sizes 1 8] [--ratios 0.25 0.5] [--regimes 1 20]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offload import heldout_prompts, run  # noqa: E402
from replay import Cost, replay, wave_steps  # noqa: E402

from engine import LLM  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402
from engine.offload.predict.trace import trace_sequences  # noqa: E402

SYSTEMS = (  # name, policy, predictor
    ("lru on demand", "lru", "none"),
    ("lfu on demand", "lfu", "none"),
    ("pregate auto + expertflow", "expertflow", "pregate"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--regimes", type=float, nargs="+", default=[1.0, 20.0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the other core is the link's: see offload.py
    tracer = LLM(model=args.model)
    prompts = heldout_prompts(tracer.tokenizer, args.prompts, args.prompt_len)
    print(f"command: {' '.join(sys.argv)}")
    for batch in args.batch_sizes:
        base = run(args.model, prompts, args.new_tokens, batch, expert_cache_ratio=1.0)
        layer_s = base["elapsed_s"] / base["steps"] / base["layers"]
        # The last sampled token is never run through the model.
        streams = [p + out[:-1] for p, out in zip(prompts, base["outputs"], strict=True)]
        traces = trace_sequences(tracer, streams, [f"prompt{i}" for i in range(len(streams))])
        steps = wave_steps(traces, batch, args.prompt_len)
        assert len(steps) == base["steps"], "the replay schedule must match the live one"
        for regime in args.regimes:
            bps = base["expert_bytes"] / (regime * layer_s)
            cost = Cost("demo", base["expert_bytes"], bps, layer_s)
            print(
                f"\n### batch {batch}, copy = {regime:g}x layer time (T_l = {layer_s * 1e3:.2f} ms, "
                f"link = {bps / 1e9:.3f} GB/s, {len(steps)} steps)\n"
            )
            print(
                "| system | ratio | misses live | replay | replay, own T_l | stall s live | replay "
                "| replay, own T_l | own T_l ms |\n|---|---|---|---|---|---|---|---|---|"
            )
            for ratio in args.ratios:
                for name, policy, predictor in SYSTEMS:
                    live = run(
                        args.model,
                        prompts,
                        args.new_tokens,
                        batch,
                        link_gbps=bps / 1e9,
                        expert_cache_ratio=ratio,
                        cache_policy=policy,
                        predictor=predictor,
                    )
                    sim = replay(traces, cost, ratio, policy, predictor, steps)
                    compute_s = live["elapsed_s"] - live["stall_seconds"]
                    own_s = compute_s / live["steps"] / live["layers"]
                    own = replay(
                        traces, replace(cost, layer_s=own_s), ratio, policy, predictor, steps
                    )
                    print(
                        f"| {name} | {ratio:.2f} | {live['misses']} | {sim['misses']} | "
                        f"{own['misses']} | {live['stall_seconds']:.3f} | {sim['stall_s']:.3f} | "
                        f"{own['stall_s']:.3f} | {own_s * 1e3:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
