"""Tune the Triton fused MoE tile configs on this GPU and write the table kernels/ loads.

    python benchmarks/tune_fused_moe.py --hidden 2048 --inter 768 --experts 128 --topk 8
    python benchmarks/tune_fused_moe.py --hidden 4096 --inter 14336 --experts 8 --topk 2

For each token count M it routes M random tokens top-k over E experts (one slot each), times
every config of the search space that fits in shared memory (triton.testing.do_bench, median,
L2 flushed), keeps the fastest and prints it next to the in-code default it replaces. The table
goes to kernels/configs/H=..,I=..,k=..,device_name=..,dtype=...json, which `fused_moe` then
picks up (nearest tuned M). Configs that fail to compile are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from kernels.moe_config import CONFIG_DIR, config_file_name, default_config, device_name, save_table

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SPACE = dict(
    BLOCK_M=(16, 32, 64, 128),
    BLOCK_N=(32, 64, 128),
    BLOCK_K=(64, 128),
    GROUP_M=(1, 16),
    num_warps=(4, 8),
    num_stages=(2, 3, 4),
)


def candidates(m: int, top_k: int, experts: int, elem_bytes: int, smem_bytes: int) -> list[dict]:
    """Search-space configs worth timing at M: no M tile far above the pairs per expert, and
    gate/up's pipelined tiles (one A, two B per stage) within shared memory."""
    pairs_per_expert = max(1, m * top_k // experts)
    configs = [
        dict(zip(SPACE, values, strict=True)) for values in itertools.product(*SPACE.values())
    ]
    return [
        c
        for c in configs
        if c["BLOCK_M"] <= max(16, 2 * pairs_per_expert)
        and c["num_stages"] * (c["BLOCK_M"] + 2 * c["BLOCK_N"]) * c["BLOCK_K"] * elem_bytes
        <= smem_bytes
    ]


def time_config(moe_triton, inputs: tuple[torch.Tensor, ...], config: dict) -> float:
    """Median ms of one fused_moe_triton call, or inf when the config fails to compile or run."""
    from triton.testing import do_bench  # triton only once tuning runs

    out = torch.empty_like(inputs[0])  # [M, H]
    try:
        return do_bench(
            lambda: moe_triton.fused_moe_triton(*inputs, out, config), return_mode="median"
        )
    except Exception as error:  # triton raises several types for "does not fit"
        print(f"  skip {config}: {type(error).__name__}", file=sys.stderr)
        return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, required=True, help="hidden size H")
    parser.add_argument("--inter", type=int, required=True, help="expert intermediate size I")
    parser.add_argument("--experts", type=int, required=True, help="routed experts per layer E")
    parser.add_argument("--topk", type=int, required=True, help="experts per token k")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--m", nargs="+", type=int, default=list(TOKEN_COUNTS), help="token counts")
    parser.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tune_fused_moe.py needs a CUDA GPU")
    from kernels import moe_triton  # imports triton: only past --help and the CUDA check

    dtype, gpu = getattr(torch, args.dtype), torch.device("cuda")
    hidden, inter, experts, top_k = args.hidden, args.inter, args.experts, args.topk
    smem_bytes = torch.cuda.get_device_properties(gpu).shared_memory_per_multiprocessor
    w13 = torch.randn(experts, 2 * inter, hidden, device=gpu).mul_(hidden**-0.5).to(dtype)
    w2 = torch.randn(experts, hidden, inter, device=gpu).mul_(inter**-0.5).to(dtype)
    best: dict[int, dict[str, int]] = {}
    print(f"# python {' '.join(sys.argv)}")
    for m in args.m:
        x = torch.randn(m, hidden, device=gpu).to(dtype)  # [M, H]
        weights, ids = torch.randn(m, experts, device=gpu).softmax(-1).topk(top_k, dim=-1)
        inputs = (x, w13, w2, weights, ids)
        space = candidates(m, top_k, experts, dtype.itemsize, smem_bytes)
        timed = [(time_config(moe_triton, inputs, config), config) for config in space]
        ms, best[m] = min(timed, key=lambda pair: pair[0])
        default_ms = time_config(moe_triton, inputs, default_config(m))
        print(f"M={m}: {ms:.3f} ms with {best[m]} (default config: {default_ms:.3f} ms)")
    path = args.out_dir / config_file_name(hidden, inter, top_k, dtype, device_name(gpu))
    save_table(best, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
