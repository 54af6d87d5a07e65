"""Fused MoE kernel benchmark on a CUDA GPU: Triton kernel vs a torch per-expert loop.

    python benchmarks/kernel.py [--models mixtral-8x7b qwen3-30b-a3b] [--m 1 4 16] [--iters 50]

For real MoE layer shapes in bfloat16 (all E experts resident, one slot each, softmax top-k
routing over random logits) and each token count M it prints the median CUDA-event time per call
(after warm-up, L2 flushed before each call) of `fused_moe(backend="triton")` and of
`fused_moe(backend="torch")`, the per-expert loop; the bandwidth the Triton call achieves on the
bytes it must move (weights of the experts used, hidden in, output out) against a measured
device-to-device copy; its TFLOP/s against a measured bf16 matmul; the speed-up over the loop;
and the relative difference of the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial

import torch

from kernels import fused_moe
from kernels.moe_config import CONFIG_DIR, config_file_name, device_name

MODELS = {  # name: (hidden H, intermediate I, experts E, top-k)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
TOKEN_COUNTS = (1, 4, 16, 64, 256, 1024, 4096)


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 5) -> float:
    """Median time of one call in ms; a 256 MiB write before each call evicts the L2 cache."""
    flush = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(iters)
    ]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_gbps(iters: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) on a 1 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src), iters) / 1e6


def matmul_tflops(iters: int) -> float:
    """Dense bf16 matmul throughput on 8192^3, the compute ceiling the kernel is compared to."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192**3 / median_ms(lambda: a @ b, iters) / 1e9


def make_layer(hidden: int, inter: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 expert weights: w13 [E, 2I, H], w2 [E, H, I], scaled to keep outputs O(1)."""
    w13 = torch.randn(experts, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda")
    w2 = torch.randn(experts, hidden, inter, dtype=torch.bfloat16, device="cuda")
    return w13.mul_(hidden**-0.5), w2.mul_(inter**-0.5)


def route(m: int, hidden: int, experts: int, top_k: int) -> tuple[torch.Tensor, ...]:
    """Tokens [M, H] with softmax top-k routing over random router logits."""
    x = torch.randn(m, hidden, dtype=torch.bfloat16, device="cuda")
    probs = torch.randn(m, experts, device="cuda").softmax(dim=-1)  # [M, E]
    weights, ids = probs.topk(top_k, dim=-1)  # [M, k]
    return x, weights / weights.sum(dim=-1, keepdim=True), ids


def bench_model(
    name: str, token_counts: list[int], iters: int, copy_bw: float, peak: float
) -> None:
    """Print one table row per token count for one model's layer shapes."""
    hidden, inter, experts, top_k = MODELS[name]
    w13, w2 = make_layer(hidden, inter, experts)
    table = config_file_name(hidden, inter, top_k, torch.bfloat16, device_name(w13.device))
    tiles = "tuned" if (CONFIG_DIR / table).is_file() else "default"
    for m in token_counts:
        x, weights, ids = route(m, hidden, experts, top_k)
        outs = {backend: torch.empty_like(x) for backend in ("triton", "torch")}  # [M, H] each
        ms = {
            backend: median_ms(partial(fused_moe, x, w13, w2, weights, ids, backend, out), iters)
            for backend, out in outs.items()
        }
        moved_bytes = ids.unique().numel() * 3 * inter * hidden * 2 + 2 * m * hidden * 2
        gbps = moved_bytes / ms["triton"] / 1e6
        tflops = 2 * m * top_k * 3 * inter * hidden / ms["triton"] / 1e9
        ref = outs["torch"].float()
        diff = ((outs["triton"].float() - ref).abs().max() / ref.abs().max()).item()
        print(
            f"| {name} | {m} | {tiles} | {ms['triton']:.3f} | {ms['torch']:.3f} | "
            f"{ms['torch'] / ms['triton']:.2f}x | {gbps:.0f} ({100 * gbps / copy_bw:.0f}%) | "
            f"{tflops:.1f} ({100 * tflops / peak:.0f}%) | {diff:.1e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--m", nargs="+", type=int, default=list(TOKEN_COUNTS), help="token counts")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel.py needs a CUDA GPU")

    copy_bw, peak = copy_gbps(args.iters), matmul_tflops(args.iters)
    print(f"# python {' '.join(sys.argv)}")
    print(
        f"# {torch.cuda.get_device_name()}: device copy {copy_bw:.0f} GB/s, "
        f"bf16 matmul {peak:.0f} TFLOP/s (the baselines below)"
    )
    print(
        "| model | M | tiles | triton ms | torch-loop ms | speed-up | GB/s (% copy) "
        "| TFLOP/s (% matmul) | rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        bench_model(name, args.m, args.iters, copy_bw, peak)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
