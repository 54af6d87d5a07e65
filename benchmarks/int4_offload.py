"""GPTQ and AWQ 4-bit experts over the link: what keeping them packed on the host saves in
transfers and stall, on the demo model.

A GPTQ-format copy of the demo model is written by round-to-nearest in groups of `--group` input
channels (tests/engine/test_packed_int.py's packer: no GPTQ calibration, so its quality is a
floor for a real GPTQ or AWQ release), with a float32 checkpoint of the values it holds. The 4-bit
copy's routed experts stay packed on the host and cross the link so, each decoded as it lands in
its slot; the float32 one's cross as float32. Both decode the same held-out prompts with half the
experts resident over the same emulated link: outputs must be identical, bytes are not. The
quality line is the original model against the 4-bit copy.

    .venv/bin/python benchmarks/int4_offload.py [--model models/expertflow-demo] [--group 64]
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fp8_offload import SYSTEMS, agreement, decode, heldout_loss  # noqa: E402
from offload import heldout_prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402
from tests.engine.test_packed_int import packed_and_reference  # noqa: E402


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--link-gbps", type=float, default=0.25, help="emulated host-to-device link")
    ap.add_argument("--ratio", type=float, default=0.5, help="share of the experts resident")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--group", type=int, default=64, help="input channels per scale")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="int4-offload-"))
    int4, reference = packed_and_reference(Path(args.model), work, "gptq", args.group)
    tokenizer = LLM(model=args.model, max_model_len=64).engine.tokenizer
    prompts = heldout_prompts(tokenizer, args.prompts, 48)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"model: {Path(args.model).name}, GPTQ 4-bit (round to nearest), groups of {args.group}; "
        f"{len(prompts)} held-out prompts of 48 tokens, {args.new_tokens} new tokens each, "
        f"batch 1, ratio {args.ratio}, link {args.link_gbps} GB/s emulated; float32 compute, "
        "1 thread"
    )
    print(
        "| system | experts | KiB an expert | transfers | MiB moved | stall s | tok/s | outputs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    flags = {"expert_cache_ratio": args.ratio, "link_gbps": args.link_gbps}
    for name, system in SYSTEMS.items():
        runs = {
            label: decode(path, prompts, args.new_tokens, **flags, **system)
            for label, path in (("float32", reference), ("4-bit", int4))
        }
        same = runs["4-bit"]["outputs"] == runs["float32"]["outputs"]
        for label, s in runs.items():
            print(
                f"| {name} | {label} | {s['expert_bytes'] / 1024:.0f} | {s['transfers']} | "
                f"{s['transfer_bytes'] / 2**20:.1f} | {s['stall_seconds']:.3f} | "
                f"{s['tokens_per_s']:.1f} | {'identical' if same else 'DIFFERENT'} |"
            )
    original, quantized = heldout_loss(Path(args.model), prompts), heldout_loss(int4, prompts)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    a = LLM(model=args.model, max_model_len=512).generate(prompts, params)
    b = LLM(model=str(int4), max_model_len=512).generate(prompts, params)
    print(
        f"quality, 4-bit copy (every projection and the LM head): held-out loss {original:.4f} "
        f"(float32) vs {quantized:.4f}, perplexity x{math.exp(quantized - original):.4f}; greedy "
        f"tokens before the first difference: {agreement(a, b)} of {len(prompts) * args.new_tokens}"
    )


if __name__ == "__main__":
    main()
