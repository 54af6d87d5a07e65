"""The two ways MLA can attend a prompt's first chunk, timed on the same random tensors.

"absorbed" is how every cached read runs (engine/models/mla.py): the query folded into the latent
space, multi-query attention over [latent, rotary key] (576 numbers a token at V2-Lite's shape),
values up-projected after. "expanded" is what a first chunk now runs, timed as the engine's own
`MLAttention._expanded`: keys and values up-projected per head first (192 + 128 numbers). Both
give the same output (the maximum difference is printed). Inference mode, as the engine runs.

    .venv/bin/python benchmarks/mla_prefill.py [--tokens 128 512 1024] [--heads 16]
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.model_config import ModelConfig  # noqa: E402
from engine.models.mla import MLAttention  # noqa: E402


def best_ms(fn: Callable[[], torch.Tensor], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def absorbed(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    w_kv: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_nope [n, h, nope], q_rope [n, h, r], latent [n, lora], k_rope [n, 1, r],
    w_kv [h, nope + v, lora] -> [n, h, v]."""
    nope, lora = q_nope.shape[2], latent.shape[1]
    w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [h, n, lora]
    query = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1)[None]  # [1, h, n, D]
    key = torch.cat([latent[:, None], k_rope], dim=-1).transpose(0, 1)[None]  # [1, 1, n, D]
    out = F.scaled_dot_product_attention(
        query, key, key[..., :lora], is_causal=True, enable_gqa=True, scale=scale
    )  # [1, h, n, lora]
    return torch.bmm(out[0], w_uv.transpose(1, 2)).transpose(0, 1)


def latent_attention(args: argparse.Namespace) -> MLAttention:
    """The engine's MLA layer at the requested shape, random weights (hidden size is irrelevant:
    only kv_b_proj takes part)."""
    raw = {
        "model_type": "deepseek_v2",
        "vocab_size": 64,
        "hidden_size": 64,
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
    layer = MLAttention(ModelConfig.from_dict(raw), 0)
    torch.nn.init.normal_(layer.kv_b_proj.weight, std=args.kv_lora_rank**-0.5)
    return layer


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--heads", type=int, default=16)  # DeepSeek-V2-Lite's shape by default
    ap.add_argument("--kv-lora-rank", type=int, default=512)
    ap.add_argument("--nope", type=int, default=128, help="qk_nope_head_dim")
    ap.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim")
    ap.add_argument("--v", type=int, default=128, help="v_head_dim")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h, nope, r, v, lora = args.heads, args.nope, args.rope, args.v, args.kv_lora_rank
    layer = latent_attention(args)
    scale = layer.scale
    assert scale is not None
    w_kv = layer.kv_b_proj.weight.detach().view(h, nope + v, lora)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"heads {h}, kv_lora_rank {lora}, nope {nope}, rope {r}, v {v}; float32, 1 thread")
    print("| tokens | absorbed ms | expanded ms | speedup | max difference |")
    print("|---|---|---|---|---|")
    for n in args.tokens:
        q_nope, q_rope = torch.randn(n, h, nope), torch.randn(n, h, r)
        latent, k_rope = torch.randn(n, lora), torch.randn(n, 1, r)

        inputs = (q_nope, q_rope, latent, k_rope)
        slow = best_ms(functools.partial(absorbed, *inputs, w_kv, scale), args.repeat)
        fast = best_ms(functools.partial(layer._expanded, *inputs), args.repeat)
        diff = (absorbed(*inputs, w_kv, scale) - layer._expanded(*inputs)).abs().max().item()
        print(f"| {n} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
