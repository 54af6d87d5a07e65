"""Does the memory profile (engine/memory.py) peak above every step real serving runs?

For each family's tiny random checkpoint and each engine shape, the engine sizes its expert cache
from the profile steps' measured peak; then a mixed workload (prompts long, short and of one
token, chunked beside decodes, n > 1, logprobs and some prompt logprobs, several seeds) runs with
every step's peak measured the same way. A ratio (worst step / profile) above 1 would leave the
expert slots less room than a step takes. On the CPU the peaks come from the profiler's allocation
events, on CUDA from the allocator (torch.cuda.max_memory_allocated).

    .venv/bin/python benchmarks/memory_profile.py [--device cuda] [--seeds 3]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine.llm_engine as llm_engine  # noqa: E402
from engine import LLM  # noqa: E402
from engine.memory import unsized  # noqa: E402
from tests.allocations import PeakProbe, peak_of, step_peaks  # noqa: E402
from tests.conftest import save_tiny_checkpoint  # noqa: E402

FAMILIES = ("mixtral", "gpt_oss", "deepseek_v3", "qwen3_next", "llama4", "glm4_moe")
SHAPES = {  # engine flags: the token budget short of a context, past it, and block size 1
    "256 ctx, 8 seats, 128-token budget": dict(
        max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128
    ),
    "64 ctx, 8 seats, 128-token budget": dict(
        max_model_len=64, max_num_seqs=8, max_num_batched_tokens=128
    ),
    "96 ctx, 24 seats, block size 1, 120 blocks": dict(
        max_model_len=96, max_num_seqs=24, block_size=1, kv_cache_blocks=120
    ),
}


def worst_step(checkpoint: Path, device: str, flags: dict[str, int], seed: int) -> tuple[int, int]:
    """(profile peak, the largest step's peak) in bytes for one workload."""
    measure = peak_of(torch.device(device))
    probe = PeakProbe(measure, 1 << 50)
    llm_engine.memory_probe = lambda config: probe if unsized(config) else None
    llm = LLM(model=str(checkpoint), device=device, **flags)
    peaks = step_peaks(llm, measure, seed)
    return probe.activations, max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--seeds", type=int, default=3, help="workloads per family and shape")
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="memory-profile-"))
    # first: training their tokenizer prints blank lines from native code
    checkpoints = {f: save_tiny_checkpoint(f, work / f) for f in args.families}
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"device={args.device}; tiny random checkpoints (tests/conftest.py), float32 on the CPU")
    print("\n| family | engine | profile KiB | worst step KiB (of seeds) | worst / profile |")
    print("|---|---|---|---|---|")
    highest = 0.0
    for family in args.families:
        checkpoint = checkpoints[family]
        for name, flags in SHAPES.items():
            runs = [worst_step(checkpoint, args.device, flags, s) for s in range(args.seeds)]
            profile, worst = max(p for p, _ in runs), max(w for _, w in runs)
            highest = max(highest, worst / profile)
            print(
                f"| {family} | {name} | {profile / 1024:.0f} | {worst / 1024:.0f} | "
                f"{worst / profile:.3f} |"
            )
    print(f"\nhighest ratio: {highest:.3f} (above 1: a step outgrew the profile)")


if __name__ == "__main__":
    main()
