"""gpt-oss's MXFP4 experts over the link: what keeping them packed saves, against the same values
held in bfloat16.

A random gpt-oss checkpoint (transformers' GptOssConfig at a small size; its routing is as random
as its weights, so most lookups miss) has its experts quantized to MXFP4 as OpenAI's release
stores them; a second copy holds exactly the values those decode to (both written by
tests/engine/test_mxfp4.py; every MXFP4 value is a bfloat16).
Both decode the same prompts in bfloat16 with a quarter of the experts resident, over the same
emulated link, on demand (LRU); then the MXFP4 one again with its slots packed
(`--mxfp4-slots packed`), as many as fit the bfloat16 run's slot memory. Outputs must be
identical; host memory, slots, link bytes and stall are not.

    .venv/bin/python benchmarks/mxfp4_offload.py [--link-gbps 1] [--hidden 512] [--layers 6]
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GptOssConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fp8_offload import decode  # noqa: E402

from tests.conftest import build_tokenizer  # noqa: E402
from tests.engine.test_mxfp4 import mxfp4_and_reference  # noqa: E402


def random_gpt_oss(folder: Path, hidden: int, layers: int, experts: int) -> None:
    """A random bfloat16 gpt-oss checkpoint with the test suite's tokenizer."""
    config = GptOssConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=experts,
        num_experts_per_tok=4,
        sliding_window=128,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512, help="hidden and expert intermediate size")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--link-gbps", type=float, default=1.0, help="emulated host-to-device link")
    ap.add_argument("--ratio", type=float, default=0.25, help="share of the experts resident")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="mxfp4-offload-"))
    random_gpt_oss(work / "source", args.hidden, args.layers, args.experts)
    packed, unpacked = mxfp4_and_reference(work / "source", work)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 2048) for _ in range(32)] for _ in range(args.prompts)]
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"random gpt-oss: hidden {args.hidden}, {args.layers} layers x {args.experts} experts, "
        f"top-4; {len(prompts)} prompts of 32 tokens, {args.new_tokens} new tokens each, batch 1, "
        f"ratio {args.ratio}, LRU on demand, link {args.link_gbps} GB/s emulated; bfloat16 "
        "compute, 1 thread"
    )
    print(
        "| experts at rest | in slots | slots | slot MiB | transfers | MiB moved | stall s | tok/s "
        "| outputs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    flags = {"link_gbps": args.link_gbps, "cache_policy": "lru", "dtype": "bfloat16"}
    runs = {
        "bfloat16": decode(
            unpacked, prompts, args.new_tokens, expert_cache_ratio=args.ratio, **flags
        ),
        "MXFP4": decode(packed, prompts, args.new_tokens, expert_cache_ratio=args.ratio, **flags),
    }
    slot_bytes = runs["bfloat16"]["resident_expert_bytes"]  # the same memory, packed
    one_packed = runs["MXFP4"]["expert_bytes"]
    runs["MXFP4 packed"] = decode(
        packed,
        prompts,
        args.new_tokens,
        expert_cache_size=int(slot_bytes // one_packed),
        mxfp4_slots="packed",
        **flags,
    )
    reference = runs["bfloat16"]["outputs"]
    for label, s in runs.items():
        held = "MXFP4" if label == "MXFP4 packed" else "bfloat16"
        print(
            f"| {label.split()[0]} | {held} | {s['expert_cache_slots']} | "
            f"{s['resident_expert_bytes'] / 2**20:.1f} | {s['transfers']} | "
            f"{s['transfer_bytes'] / 2**20:.1f} | {s['stall_seconds']:.3f} | "
            f"{s['tokens_per_s']:.1f} | {'identical' if s['outputs'] == reference else 'DIFFERENT'} |"
        )
    base = runs["bfloat16"]
    for label in ("MXFP4", "MXFP4 packed"):
        run = runs[label]
        print(
            f"{label} / bfloat16: bytes an expert x{run['expert_bytes'] / base['expert_bytes']:.3f}, "
            f"transfers x{run['transfers'] / base['transfers']:.3f}, "
            f"stall x{run['stall_seconds'] / max(base['stall_seconds'], 1e-9):.3f}, "
            f"tok/s x{run['tokens_per_s'] / base['tokens_per_s']:.2f}"
        )


if __name__ == "__main__":
    main()
