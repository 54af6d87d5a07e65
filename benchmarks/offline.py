"""Offline throughput: ExpertFlow's `LLM.generate` against transformers' batched `generate`.

Both get the same prompts (random token ids of mixed lengths), greedy decoding and the same number
of new tokens per request (EOS may be sampled but stops nothing): `--new-tokens` each, or spread
evenly over `--min-new-tokens`..`--new-tokens`. We run all `--num-prompts` requests through
continuous batching with `--num-seqs` running at once; transformers runs them as static left-padded
batches of `--num-seqs` in arrival order, each decoding until its longest request is done (only the
tokens each request asked for are counted). Each side is warmed up once, then the two are timed
alternately `--repeat` times and each side's best run is kept (the machine's load varies).

    .venv/bin/python benchmarks/offline.py [--model PATH] [--num-seqs 16] [--new-tokens 64]
        [--num-prompts 64 --min-new-tokens 8]

Without --model it uses the bundled demo model, or a tiny random Mixtral if that is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import LLM, ModelConfig, SamplingParams  # noqa: E402
from engine.config import DEFAULT_MODEL, DTYPES  # noqa: E402


def model_folder(path: str | None, workdir: Path) -> tuple[str, str]:
    """The checkpoint to benchmark and a description of it."""
    if path is not None or (Path(DEFAULT_MODEL) / "config.json").is_file():
        return path or DEFAULT_MODEL, path or "bundled demo model"
    spec = importlib.util.spec_from_file_location("ef_conftest", ROOT / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    folder = conftest.save_tiny_checkpoint("mixtral", workdir / "tiny-mixtral")
    return str(folder), "tiny random Mixtral from tests/conftest.py (demo model missing)"


def make_prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]  # evenly spread lo..hi
    rng.shuffle(lengths)
    return [[rng.randrange(10, vocab) for _ in range(length)] for length in lengths]


def output_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed + 1)
    lengths = [lo + (hi - lo) * i // max(n - 1, 1) for i in range(n)]
    rng.shuffle(lengths)
    return lengths


def run_ours(
    llm: LLM, prompts: list[list[int]], new_tokens: list[int]
) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in new_tokens]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, [o.token_ids for o in outs]


def run_hf(
    model: torch.nn.Module,
    prompts: list[list[int]],
    new_tokens: list[int],
    batch_size: int,
    pad_id: int,
    device: str,
) -> tuple[float, list[list[int]]]:
    """Static batches in arrival order; each row keeps the tokens its request asked for."""
    elapsed, tokens = 0.0, []
    for first in range(0, len(prompts), batch_size):
        batch = slice(first, first + batch_size)
        seconds, out = run_hf_batch(model, prompts[batch], max(new_tokens[batch]), pad_id, device)
        elapsed += seconds
        tokens += [row[:n] for row, n in zip(out, new_tokens[batch], strict=True)]
    return elapsed, tokens


@torch.inference_mode()
def run_hf_batch(
    model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int, device: str
) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, L], left-padded
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return elapsed, out[:, width:].tolist()  # [B, new_tokens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    ap.add_argument("--num-seqs", type=int, default=16, help="concurrent sequences")
    ap.add_argument("--num-prompts", type=int, default=0, help="requests (0: --num-seqs)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (most)")
    ap.add_argument("--min-new-tokens", type=int, default=0, help="fewest (0: --new-tokens)")
    ap.add_argument("--min-prompt", type=int, default=8, help="shortest prompt (tokens)")
    ap.add_argument("--max-prompt", type=int, default=200, help="longest prompt (tokens)")
    ap.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side (best is kept)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path, described = model_folder(args.model, Path(tmp))
        mc = ModelConfig.from_pretrained(path)
        num_prompts = args.num_prompts or args.num_seqs
        prompts = make_prompts(
            mc.vocab_size, num_prompts, args.min_prompt, args.max_prompt, args.seed
        )
        min_new = args.min_new_tokens or args.new_tokens
        new_tokens = output_lengths(num_prompts, min_new, args.new_tokens, args.seed)
        warmup = [p[:8] for p in prompts[:2]]
        max_len = min(args.max_prompt + args.new_tokens, mc.max_position_embeddings)
        llm = LLM(
            model=path,
            dtype=args.dtype,
            device=args.device,
            max_model_len=max_len,
            max_num_seqs=args.num_seqs,
            enable_prefix_caching=False,  # the repeats resend the same prompts; transformers recomputes
        )
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype])
        hf = hf.to(args.device).eval()
        hf.generation_config.eos_token_id = None  # = ignore_eos (min_new_tokens would forbid EOS)
        pad_id = mc.eos_token_ids[0] if mc.eos_token_ids else 0
        run_ours(llm, warmup, [4, 4])
        run_hf(hf, warmup, [4, 4], args.num_seqs, pad_id, args.device)
        ours_times, hf_times = [], []
        for _ in range(args.repeat):  # alternate, so both sides see the same machine load
            ours_s, ours_tokens = run_ours(llm, prompts, new_tokens)
            hf_s, hf_tokens = run_hf(hf, prompts, new_tokens, args.num_seqs, pad_id, args.device)
            ours_times.append(ours_s)
            hf_times.append(hf_s)
        ours_s, hf_s = min(ours_times), min(hf_times)

    n_ours, n_hf = sum(map(len, ours_tokens)), sum(map(len, hf_tokens))
    same = sum(a == b for a, b in zip(ours_tokens, hf_tokens, strict=True))
    lengths = sorted(len(p) for p in prompts)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"model: {described} ({mc.family}, {mc.num_layers} layers, {mc.num_experts} experts); "
        f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}"
    )
    print(
        f"workload: {num_prompts} requests, {args.num_seqs} at once, prompts "
        f"{lengths[0]}..{lengths[-1]} tokens (total {sum(lengths)}), "
        f"{min(new_tokens)}..{max(new_tokens)} new tokens each (total {sum(new_tokens)}), "
        "greedy, EOS ignored"
    )
    print(
        f"expertflow LLM.generate:     {n_ours:6d} tokens in {ours_s:7.2f} s = "
        f"{n_ours / ours_s:8.1f} output tokens/s"
    )
    print(
        f"transformers generate (pad): {n_hf:6d} tokens in {hf_s:7.2f} s = "
        f"{n_hf / hf_s:8.1f} output tokens/s"
    )
    print(f"ratio expertflow / transformers: {(n_ours / ours_s) / (n_hf / hf_s):.2f}x")
    print(
        "all runs (s): expertflow "
        + " ".join(f"{t:.2f}" for t in ours_times)
        + ", transformers "
        + " ".join(f"{t:.2f}" for t in hf_times)
    )
    print(f"identical greedy outputs: {same}/{len(prompts)} sequences")


if __name__ == "__main__":
    main()
