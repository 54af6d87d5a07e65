"""Offloading over a real link: Mixtral-shaped random experts on a GPU, with real CUDA streams.

Issue #6's GPU run: the baseline (`lru` on demand) and the best system of the CPU tables
(`pregate` auto + `expertflow` + resident-first; pre-gate needs no training, which random weights
could not give a trained predictor anyway) against all-resident, on a random-weight checkpoint
with Mixtral-8x7B's layer shape (hidden 4096, 8 experts of intermediate 14336, top-2: 336 MiB an
expert in bfloat16) but fewer layers, so that all-resident fits a single GPU for the reference.
Copies go over PCIe from pinned host memory on the copy streams; stall is what the compute stream
waits on them (CUDA events). It also measures the pinned host -> device bandwidth and the
all-resident layer time, which place the run on the CPU tables' regimes (copy / layer time).

    python benchmarks/offload_gpu.py        # on a GPU: 10.5 GiB of experts (not yet timed)
    python benchmarks/offload_gpu.py --device cpu --hidden 64 --intermediate 128   # a smoke run

Random routers spread tokens over the experts about evenly, so hit rates sit near the cache ratio
for an on-demand policy; what this run measures is whether prefetching over real streams hides
the copies, not a real model's routing. The stall bound column stays 0: it needs an emulated
link's fixed copy time.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offload import _row, run  # noqa: E402

SYSTEMS: dict[str, dict[str, object]] = {
    "lru on demand": {"cache_policy": "lru"},
    "pregate auto + expertflow + RF": {
        "cache_policy": "expertflow",
        "predictor": "pregate",
        "resident_first": True,
    },
}


def checkpoint(args: argparse.Namespace) -> Path:
    """A random Mixtral-shaped checkpoint with the tests' tokenizer, made once under --workdir."""
    folder = Path(args.workdir) / (
        f"mixtral-l{args.layers}-h{args.hidden}-i{args.intermediate}-e{args.experts}-{args.dtype}"
    )
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.spec_from_file_location("ef_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(conftest)  # type: ignore[union-attr]
    tokenizer = conftest.build_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"made {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def host_to_device_gbps(nbytes: int, device: str) -> float:
    """Pinned host -> device copy rate of one expert's bytes, best of 5 (0 on the CPU: no link)."""
    if device != "cuda":
        return 0.0
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9


def measured(*args: object, **flags: object) -> dict:
    """offload.run, then the run's engine is let go before the next one sizes its memory."""
    stats = run(*args, **flags)  # type: ignore[arg-type]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "offload_gpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU (--device cpu runs the same systems on the CPU)")
    model = str(checkpoint(args))
    vocab = MixtralConfig.from_pretrained(model).vocab_size
    rng = random.Random(0)
    prompts = [
        [rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(args.prompts)
    ]
    flags = {"device": args.device, "dtype": args.dtype, "max_model_len": 512}
    print(f"command: {' '.join(sys.argv)}")
    header = (
        "| system | ratio | hit rate | misses | Belady | transfers | MiB moved | stall s | in decode "
        "| stall bound | tok/s | recall | S |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for batch in args.batch_sizes:
        measured(model, prompts[:batch], 2, batch, expert_cache_ratio=1.0, **flags)  # kernels' JIT
        base = min(
            (
                measured(model, prompts, args.new_tokens, batch, expert_cache_ratio=1.0, **flags)
                for _ in range(2)
            ),
            key=lambda s: s["elapsed_s"],
        )
        layer_s = base["elapsed_s"] / base["steps"] / base["layers"]
        gbps = host_to_device_gbps(base["expert_bytes"], args.device)
        copy = f"copy {base['expert_bytes'] / gbps / 1e6:.2f} ms" if gbps else "no link"
        regime = f" = {base['expert_bytes'] / gbps / 1e9 / layer_s:.1f}x layer time" if gbps else ""
        print(
            f"\n### batch {batch}: T_l = {layer_s * 1e3:.2f} ms, expert = "
            f"{base['expert_bytes'] / 2**20:.0f} MiB, pinned host -> device {gbps:.1f} GB/s, "
            f"{copy}{regime}\n\n{header}\n{_row('all resident', 1.0, base)}",
            flush=True,
        )
        for ratio in args.ratios:
            for name, system in SYSTEMS.items():
                stats = measured(
                    model,
                    prompts,
                    args.new_tokens,
                    batch,
                    expert_cache_ratio=ratio,
                    **flags,
                    **system,
                )
                same = "" if stats["outputs"] == base["outputs"] else " (outputs differ!)"
                print(_row(name, ratio, stats) + same, flush=True)


if __name__ == "__main__":
    main()
