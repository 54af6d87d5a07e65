"""GPTQ and AWQ 4-bit experts over the link: what keeping them packed on the host saves in
transfers and stall, on the demo model.

A GPTQ-format copy of the demo model is written by round-to-nearest in groups of `--group` input
channels (tests/packed_checkpoints.py's packer: no GPTQ calibration, so its quality is a
floor for a real GPTQ or AWQ release), with a float32 checkpoint of the values it holds. The 4-bit
copy's routed experts stay packed on the host and cross the link so, each decoded as it lands in
its slot; the float32 one's cross as float32. Both decode the same held-out prompts with half the
experts resident over the same emulated link: outputs must be identical, bytes are not. Then the
4-bit copy runs with every expert resident, its slots decoded or kept packed (`--int4-slots`):
the memory they take and, on the CPU's torch path, what decoding on every use costs. The quality
line is the original model against the 4-bit copy.

    .venv/bin/python benchmarks/int4_offload.py [--model models/expertflow-demo] [--group 64]
"""

from __future__ import annotations

import math
import shlex
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fp8_offload import agreement, decode, heldout_loss, link_arguments, link_table  # noqa: E402
from offload import heldout_prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from tests.packed_checkpoints import packed_and_reference  # noqa: E402

SLOTS = ("decoded", "packed")  # on the CPU, packed slots are decoded on every use


@torch.inference_mode()
def main() -> None:
    ap = link_arguments(__doc__)
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
    flags = {"expert_cache_ratio": args.ratio, "link_gbps": args.link_gbps}
    link_table(reference, ("4-bit", int4), prompts, args.new_tokens, **flags)
    runs = {slots: decode(int4, prompts, args.new_tokens, int4_slots=slots) for slots in SLOTS}
    for slots, s in runs.items():
        same = s["outputs"] == runs["decoded"]["outputs"]
        print(
            f"every expert resident, slots {slots}: "
            f"{s['resident_expert_bytes'] / 2**20:.1f} MiB of "
            f"slots, {s['tokens_per_s']:.1f} tok/s, outputs {'identical' if same else 'DIFFERENT'}"
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
