"""Llama 4's chunked attention layers: the paged path (a first prompt chunk as causal SDPA calls
chunk by chunk; cached groups over the blocks their chunk reaches, under a mask built once a
step) against the masked sink path those layers took before (engine/attention_sinks.py: a mask
per head built on every call), on the same batches, interleaved, in one run.

    .venv/bin/python benchmarks/chunked_attention.py [--heads 16 --kv-heads 4 --head-dim 64]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention import AttentionBatch, paged_attention  # noqa: E402
from engine.attention_sinks import sink_group  # noqa: E402
from engine.family_config import LocalAttention  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402

BLOCK = 16


def sink_path(q, k, v, batch, window):  # noqa: ANN001, ANN201
    """What chunked layers ran before: every group through sink_group (no sinks)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    for g in batch.groups:
        out[g.rows] = sink_group(q, k, v, 0, batch, g, None, None, window)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8192, help="attention_chunk_size")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    window = LocalAttention(args.chunk, chunked=True)
    cases = {  # name -> (cached tokens, new tokens) per sequence
        "8 decodes, 2048 cached": ([2047] * 8, [1] * 8),
        "prompt chunk of 512 after 1024": ([1024], [512]),
        "first prompt chunk of 2048": ([0], [2048]),
    }
    width = 2048 // BLOCK + 1
    kv = KVCache.allocate(
        1, 8 * width, BLOCK, (args.kv_heads, args.head_dim, args.head_dim), torch.float32, "cpu"
    )
    kv.k[0].normal_()
    kv.v[0].normal_()
    tables = [list(range(i * width, (i + 1) * width)) for i in range(8)]
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"{args.heads} query / {args.kv_heads} KV heads of {args.head_dim}, chunks of "
        f"{args.chunk}, blocks of {BLOCK}; float32, 1 thread, median of {args.repeat}, ms a layer"
    )
    print("| batch | sink path | paged path | speed-up | max abs difference |")
    print("|---|---|---|---|---|")
    for name, (starts, lengths) in cases.items():
        batch = AttentionBatch.build(kv, tables[: len(starts)], starts, lengths, "cpu", window)
        tokens = sum(lengths)
        q = torch.randn(tokens, args.heads, args.head_dim)
        k, v = (torch.randn(tokens, args.kv_heads, args.head_dim) for _ in range(2))
        times: dict[str, list[float]] = {"sink": [], "paged": []}
        outs = {}
        for _ in range(args.repeat):
            for label, run in (
                ("sink", lambda: sink_path(q, k, v, batch, window)),  # noqa: B023
                ("paged", lambda: paged_attention(q, k, v, 0, batch, window=window)),  # noqa: B023
            ):
                start = time.perf_counter()
                outs[label] = run()
                times[label].append((time.perf_counter() - start) * 1e3)
        sink, paged = (statistics.median(times[x]) for x in ("sink", "paged"))
        diff = (outs["sink"] - outs["paged"]).abs().max().item()
        print(f"| {name} | {sink:.2f} | {paged:.2f} | {sink / paged:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
