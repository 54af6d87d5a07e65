"""FP8 experts over the link: what they save in transfers and stall, and what FP8's
rounding costs, on the demo model.

`expertflow quantize-fp8` makes a block-wise FP8 copy of the model (engine/quantize.py). Two
checkpoints then hold the same values: the FP8 one, whose experts stay FP8 in the cache, and a
float32 one written from its dequantized weights. The FP8 one's experts cross the link as FP8 and
are dequantized as they land in their slots. Both decode the same held-out prompts with half the
experts resident, over the same emulated link, on demand (LRU) and with pre-gate prefetching:
their outputs must be identical, their bytes are not. The quality cost is the original float32
model against the FP8 copy: held-out loss and greedy agreement; and against the original served
with `--expert-quantization fp8` or `mxfp4` (only the routed experts quantized, as they load).

    .venv/bin/python benchmarks/fp8_offload.py [--model models/expertflow-demo] [--link-gbps 0.25]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from offload import heldout_prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL  # noqa: E402
from engine.quantize import quantize_checkpoint  # noqa: E402
from kernels.fp8 import dequantize_blocks  # noqa: E402

SYSTEMS = {
    "lru on demand": {"cache_policy": "lru"},
    "pregate auto + expertflow + RF": {
        "cache_policy": "expertflow",
        "predictor": "pregate",
        "resident_first": True,
    },
}


def dequantized_copy(fp8: Path, out: Path, block: tuple[int, int]) -> None:
    """A float32 checkpoint of the values the FP8 one holds (single-file checkpoints only)."""
    quantized = load_file(fp8 / "model.safetensors")
    weights = {
        key: dequantize_blocks(t, quantized[key + "_scale_inv"], block)
        if t.dtype == torch.float8_e4m3fn
        else t
        for key, t in quantized.items()
        if not key.endswith("_scale_inv")
    }
    out.mkdir()
    for file in fp8.iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            (out / file.name).write_bytes(file.read_bytes())
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def decode(model: Path, prompts: list[list[int]], tokens: int, **flags: object) -> dict:
    llm = LLM(model=str(model), max_num_seqs=1, **flags)
    start = time.perf_counter()
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    )
    elapsed = time.perf_counter() - start
    stats = llm.offload_stats()
    stats["tokens_per_s"] = sum(len(o.token_ids) for o in outs) / elapsed
    stats["outputs"] = [o.token_ids for o in outs]
    stats["expert_bytes"] = llm.engine.offload.store.expert_bytes
    llm.engine.offload.close()
    return stats


def link_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The flags of a quantized-experts-over-the-link benchmark."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--link-gbps", type=float, default=0.25, help="emulated host-to-device link")
    ap.add_argument("--ratio", type=float, default=0.5, help="share of the experts resident")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    return ap


def link_table(
    reference: Path,
    quantized: tuple[str, Path],
    prompts: list[list[int]],
    tokens: int,
    **flags: object,
) -> None:
    """Print each system's run on the float32 `reference` and on the (label, path) `quantized`
    copy of the same values: bytes an expert and moved, stall, speed, and whether their outputs
    are identical (they must be)."""
    print(
        "| system | experts | KiB an expert | transfers | MiB moved | stall s | tok/s | outputs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    label, path = quantized
    for name, system in SYSTEMS.items():
        runs = {
            "float32": decode(reference, prompts, tokens, **flags, **system),
            label: decode(path, prompts, tokens, **flags, **system),
        }
        same = runs[label]["outputs"] == runs["float32"]["outputs"]
        for run, s in runs.items():
            print(
                f"| {name} | {run} | {s['expert_bytes'] / 1024:.0f} | {s['transfers']} | "
                f"{s['transfer_bytes'] / 2**20:.1f} | {s['stall_seconds']:.3f} | "
                f"{s['tokens_per_s']:.1f} | {'identical' if same else 'DIFFERENT'} |"
            )


def heldout_loss(model: Path, prompts: list[list[int]], **flags: object) -> float:
    """Mean negative log-likelihood per token of the held-out prompts."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = LLM(model=str(model), max_model_len=512, **flags).generate(prompts, params)
    scores = [e.logprob for o in outs for e in (o.prompt_logprobs or [])[1:] if e is not None]
    return -sum(scores) / len(scores)


@torch.inference_mode()
def main() -> None:
    ap = link_arguments(__doc__)
    ap.add_argument("--block", type=int, nargs=2, default=(128, 128))
    args = ap.parse_args()
    torch.set_num_threads(1)
    block = tuple(args.block)
    work = Path(tempfile.mkdtemp(prefix="fp8-offload-"))
    fp8, reference = work / "fp8", work / "reference"
    quantize_checkpoint(Path(args.model), fp8, block)  # type: ignore[arg-type]
    dequantized_copy(fp8, reference, block)  # type: ignore[arg-type]
    tokenizer = LLM(model=args.model, max_model_len=64).engine.tokenizer
    prompts = heldout_prompts(tokenizer, args.prompts, 48)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"model: {Path(args.model).name}, FP8 blocks {block[0]}x{block[1]}; {len(prompts)} held-out prompts "
        f"of 48 tokens, {args.new_tokens} new tokens each, batch 1, ratio {args.ratio}, "
        f"link {args.link_gbps} GB/s emulated; float32 compute, 1 thread"
    )
    flags = {"expert_cache_ratio": args.ratio, "link_gbps": args.link_gbps}
    link_table(reference, ("FP8", fp8), prompts, args.new_tokens, **flags)
    original, quantized = heldout_loss(Path(args.model), prompts), heldout_loss(fp8, prompts)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    a = LLM(model=args.model, max_model_len=512).generate(prompts, params)
    b = LLM(model=str(fp8), max_model_len=512).generate(prompts, params)
    rows = [("FP8 copy", quantized, b)]
    for scheme in ("fp8", "mxfp4", "int4"):
        loss = heldout_loss(Path(args.model), prompts, expert_quantization=scheme)
        llm = LLM(model=args.model, max_model_len=512, expert_quantization=scheme)
        rows.append((f"experts {scheme} at load", loss, llm.generate(prompts, params)))
    total = len(prompts) * args.new_tokens
    for label, loss, outs in rows:
        print(
            f"quality, {label}: held-out loss {original:.4f} (float32) vs {loss:.4f}, "
            f"perplexity x{math.exp(loss - original):.4f}; greedy tokens before the first "
            f"difference: {agreement(a, outs)} of {total}"
        )


def agreement(ours: list, theirs: list) -> int:
    """Greedy tokens of each output before its first difference from the other, summed."""
    return sum(
        next(
            (i for i, (x, y) in enumerate(zip(o.token_ids, p.token_ids, strict=True)) if x != y),
            len(o.token_ids),
        )
        for o, p in zip(ours, theirs, strict=True)
    )


if __name__ == "__main__":
    main()
