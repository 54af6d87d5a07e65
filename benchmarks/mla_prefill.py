"""The two ways MLA can attend a prefill chunk, timed as the engine's own `MLAttention` layer.

"absorbed" is how every decode runs (engine/models/mla.py): the query folded into the latent
space, multi-query attention over [latent, rotary key] (576 numbers a token at V2-Lite's shape),
values up-projected after. "expanded" is how prefill chunks run: keys and values up-projected per
head first (192 + 128 numbers), for the price of up-projecting the chunk's whole context. Each row
runs the layer's forward on the same random chunk both ways (`MLAttention._expands` forced off,
then on) and prints the largest difference. With `--prefix P` the chunk follows P cached tokens
(written by a first forward) and attends P + n keys; the engine expands such a chunk from
`expand_min_queries` queries on. Inference mode, one thread, as the engine runs on the CPU.

    .venv/bin/python benchmarks/mla_prefill.py [--tokens 128 512 1024] [--prefix 0] [--heads 16]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention import AttentionBatch  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402
from engine.model_config import ModelConfig  # noqa: E402
from engine.models.layers import Rotary  # noqa: E402
from engine.models.mla import MLAttention  # noqa: E402

BLOCK = 16


def latent_attention(args: argparse.Namespace) -> tuple[MLAttention, Rotary]:
    """The engine's MLA layer at the requested shape with random weights, and its rotary."""
    raw = {
        "model_type": "deepseek_v2",
        "vocab_size": 64,
        "hidden_size": args.hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": args.heads,
        "n_routed_experts": 2,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": 8,
        "q_lora_rank": None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.nope,
        "qk_rope_head_dim": args.rope,
        "v_head_dim": args.v,
    }
    cfg = ModelConfig.from_dict(raw)
    layer = MLAttention(cfg, 0)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    return layer, Rotary(cfg)


def best_ms(layer: MLAttention, expand: bool, inputs: tuple, repeat: int) -> float:
    layer._expands = lambda group: expand  # type: ignore[method-assign]
    times = []
    for _ in range(repeat + 1):  # the first run warms up
        start = time.perf_counter()
        layer(*inputs)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times[1:])


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--prefix", type=int, nargs="+", default=[0], help="cached tokens before")
    ap.add_argument("--heads", type=int, default=16)  # DeepSeek-V2-Lite's shape by default
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--kv-lora-rank", type=int, default=512)
    ap.add_argument("--nope", type=int, default=128, help="qk_nope_head_dim")
    ap.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim")
    ap.add_argument("--v", type=int, default=128, help="v_head_dim")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer, rotary = latent_attention(args)
    geometry = (1, args.kv_lora_rank + args.rope, 0)  # one latent and rotary key a token
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"heads {args.heads}, hidden {args.hidden}, kv_lora_rank {args.kv_lora_rank}, "
        f"nope {args.nope}, rope {args.rope}, v {args.v}; float32, 1 thread"
    )
    print(
        f"the engine expands a chunk after a cached prefix from {layer.expand_min_queries} queries"
    )
    print("| cached | tokens | absorbed ms | expanded ms | speedup | max difference |")
    print("|---|---|---|---|---|---|")
    for prefix in args.prefix:
        for n in args.tokens:
            num_blocks = -(-(prefix + n) // BLOCK)
            kv = KVCache.allocate(1, num_blocks, BLOCK, geometry, torch.float32, "cpu")
            table = [list(range(num_blocks))]
            if prefix:  # the cached prefix, written by a first chunk
                batch = AttentionBatch.build(kv, table, [0], [prefix], "cpu")
                x = torch.randn(prefix, args.hidden)
                layer(x, rotary(torch.arange(prefix), x.dtype), batch)
            x = torch.randn(n, args.hidden)
            rope = rotary(torch.arange(prefix, prefix + n), x.dtype)
            inputs = (x, rope, AttentionBatch.build(kv, table, [prefix], [n], "cpu"))
            slow = best_ms(layer, False, inputs, args.repeat)
            reference = layer(*inputs)
            fast = best_ms(layer, True, inputs, args.repeat)
            diff = (layer(*inputs) - reference).abs().max().item()
            print(f"| {prefix} | {n} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
