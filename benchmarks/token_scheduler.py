"""EF-24 token scheduler micro-benchmark: clustering cost and activated experts vs FCFS grouping.

    .venv/bin/python benchmarks/token_scheduler.py [--group-size 8] [--layers 32] [--experts 64]

For N candidates in {16, 64, 256} with synthetic routes (top-k experts per layer; L*E = 2048 by
default) it prints the median and minimum wall time of `TokenScheduler.group` (the whole call:
similarity, k-medoids, both objectives; the minimum is the cost without interference from other
processes on a shared CPU) and the objective (distinct experts summed over groups and layers)
against FCFS chunks in arrival order. "planted": 4 prototype routes, each sequence a copy with 20%
of its expert picks redrawn, shuffled; "random": independent routes, the case with least to gain.
One torch thread by default: the scheduler runs between steps on the engine thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from scheduler.token_scheduler import TokenScheduler, TokenSchedulerConfig


def routes_for(kind: str, n: int, layers: int, experts: int, top_k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    if kind == "random":
        picks = torch.rand(n, layers, experts, generator=gen).topk(top_k, -1).indices  # [N, L, k]
    else:
        protos = torch.rand(4, layers, experts, generator=gen).topk(top_k, -1).indices  # [4, L, k]
        picks = protos[torch.arange(n) % 4].clone()  # [N, L, k]
        noisy = torch.rand(picks.shape, generator=gen) < 0.2
        picks[noisy] = torch.randint(experts, (int(noisy.sum()),), generator=gen)
        picks = picks[torch.randperm(n, generator=gen)]
    return torch.zeros(n, layers, experts, dtype=torch.bool).scatter_(-1, picks, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scheduler = TokenScheduler(TokenSchedulerConfig(group_size=args.group_size))
    print("$ .venv/bin/python " + " ".join(sys.argv))
    print(
        f"group_size={args.group_size} L={args.layers} E={args.experts} top_k={args.top_k} "
        f"torch threads={torch.get_num_threads()}"
    )
    row = "{:>8} {:>4} {:>6} {:>9} {:>7} {:>9} {:>6} {:>6}"
    print(row.format("routes", "N", "groups", "median ms", "min ms", "objective", "fcfs", "ratio"))
    for kind in ("planted", "random"):
        for n in (16, 64, 256):
            routes = routes_for(kind, n, args.layers, args.experts, args.top_k)
            runs = [scheduler.group(routes) for _ in range(args.repeats + 1)][1:]  # drop warm-up
            costs_ms = [g.cost_s * 1e3 for g in runs]
            g = runs[0]
            median_ms, min_ms = statistics.median(costs_ms), min(costs_ms)
            ratio = g.objective / g.fcfs_objective
            print(
                row.format(
                    kind,
                    n,
                    len(g.groups),
                    f"{median_ms:.2f}",
                    f"{min_ms:.2f}",
                    g.objective,
                    g.fcfs_objective,
                    f"{ratio:.2f}",
                )
            )


if __name__ == "__main__":
    main()
