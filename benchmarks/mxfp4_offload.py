"""gpt-oss's MXFP4 experts over the link: what keeping them packed saves, against the same values
held in bfloat16.

A random gpt-oss checkpoint (transformers' GptOssConfig at a small size; its routing is as random
as its weights, so most lookups miss) has its experts quantized to MXFP4 as OpenAI's release
stores them. A second copy holds exactly those values in bfloat16 (every MXFP4 value is one).
Both decode the same prompts in bfloat16 with a quarter of the experts resident, over the same
emulated link, on demand (LRU): their outputs must be identical, their host memory and link bytes
are not.

    .venv/bin/python benchmarks/mxfp4_offload.py [--link-gbps 1] [--hidden 512] [--layers 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import LLM, SamplingParams  # noqa: E402
from kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4  # noqa: E402

EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")


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
    spec = importlib.util.spec_from_file_location("ef_conftest", ROOT / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    conftest.build_tokenizer().save_pretrained(folder)


def packed_and_unpacked(source: Path, packed: Path, unpacked: Path) -> None:
    """`source`'s experts as MXFP4 blocks and scales ([E, out, in/32, 16], as OpenAI stores them)
    in `packed`; the values those decode to, in bfloat16, in `unpacked`."""
    weights = load_file(source / "model.safetensors")
    quantized, decoded = dict(weights), dict(weights)
    for key in [k for k in weights if k.endswith(EXPERT_WEIGHTS)]:
        blocks, scales = quantize_mxfp4(weights[key].transpose(1, 2))  # [E, out, in]
        del quantized[key]
        quantized[key + "_blocks"], quantized[key + "_scales"] = blocks, scales
        values = torch.stack(
            [dequantize_mxfp4(b, s, torch.bfloat16) for b, s in zip(blocks, scales, strict=True)]
        )
        decoded[key] = values.transpose(1, 2).contiguous()  # [E, in, out] as on the hub
    for folder, tensors in ((packed, quantized), (unpacked, decoded)):
        folder.mkdir()
        for f in source.iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (packed / "config.json").write_text(json.dumps(config))


def decode(model: Path, prompts: list[list[int]], tokens: int, **flags: object) -> dict:
    llm = LLM(model=str(model), dtype="bfloat16", max_num_seqs=1, **flags)
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
    packed, unpacked = work / "mxfp4", work / "bf16"
    packed_and_unpacked(work / "source", packed, unpacked)
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
        "| experts at rest | KiB an expert | MiB on the host | transfers | MiB moved | stall s | tok/s | outputs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    flags = {"expert_cache_ratio": args.ratio, "link_gbps": args.link_gbps, "cache_policy": "lru"}
    runs = {
        label: decode(path, prompts, args.new_tokens, **flags)
        for label, path in (("bfloat16", unpacked), ("MXFP4", packed))
    }
    same = runs["MXFP4"]["outputs"] == runs["bfloat16"]["outputs"]
    for label, s in runs.items():
        print(
            f"| {label} | {s['expert_bytes'] / 1024:.0f} | {s['total_expert_bytes'] / 2**20:.1f} | "
            f"{s['transfers']} | {s['transfer_bytes'] / 2**20:.1f} | {s['stall_seconds']:.3f} | "
            f"{s['tokens_per_s']:.1f} | {'identical' if same else 'DIFFERENT'} |"
        )
    base, packed_run = runs["bfloat16"], runs["MXFP4"]
    print(
        f"MXFP4 / bfloat16: bytes an expert x{packed_run['expert_bytes'] / base['expert_bytes']:.3f}, "
        f"stall x{packed_run['stall_seconds'] / max(base['stall_seconds'], 1e-9):.3f}, "
        f"tok/s x{packed_run['tokens_per_s'] / base['tokens_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
