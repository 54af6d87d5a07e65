"""Serving benchmark, like vLLM's: TTFT, TPOT, ITL (mean, p50, p99) and output tokens/s at several
concurrency levels, measured through the OpenAI API against a running server (or one it launches).

    python benchmarks/serving.py --base-url http://localhost:8000/v1
    python benchmarks/serving.py --launch --server-args "--max-num-seqs 32 --expert-cache-ratio 0.5"

Every request asks for exactly --output-len tokens (ignore_eos), so levels are comparable. TTFT is
until the first chunk with text; ITL is per SSE chunk (a chunk can carry several tokens when the
client falls behind, as in vLLM's benchmark); TPOT = (latency - TTFT) / (tokens - 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "expert", "router", "token", "layer", "cache", "prefetch", "memory", "batch", "stream", "kernel",
    "python", "function", "list", "value", "return", "import", "class", "module", "string", "number",
    "error", "file", "data", "model", "state", "queue", "thread",
)  # fmt: skip


@dataclass
class RequestResult:
    ttft_s: float
    latency_s: float
    itl_s: list[float]
    output_tokens: int


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s or [float("nan")]) * 1000.0
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
    }


def make_prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


async def one_request(
    client: AsyncOpenAI, args: argparse.Namespace, model: str, prompt: str
) -> RequestResult:
    common = {
        "model": model, "max_tokens": args.output_len, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    start = time.perf_counter()
    if args.endpoint == "chat":
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **common
        )
    else:
        stream = await client.completions.create(prompt=prompt, **common)
    arrivals, tokens = [], 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text = choice.delta.content if args.endpoint == "chat" else choice.text
            if text:
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if tokens != args.output_len:
        raise RuntimeError(f"asked for {args.output_len} tokens, the server reported {tokens}")
    first = arrivals[0] if arrivals else end
    return RequestResult(first - start, end - start, list(np.diff(arrivals)), tokens)


async def run_level(
    client: AsyncOpenAI, args: argparse.Namespace, model: str, concurrency: int
) -> LevelResult:
    count = args.num_prompts or max(8, 4 * concurrency)
    prompts = make_prompts(count, args.input_words, args.seed + concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(prompt: str) -> RequestResult:
        async with gate:
            return await one_request(client, args, model, prompt)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(p) for p in prompts))
    duration_s = time.perf_counter() - start
    tpot = [
        (r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in results if r.output_tokens > 1
    ]
    return LevelResult(
        concurrency=concurrency,
        requests=count,
        duration_s=duration_s,
        output_tokens_per_s=sum(r.output_tokens for r in results) / duration_s,
        requests_per_s=count / duration_s,
        ttft_ms=summary_ms([r.ttft_s for r in results]),
        tpot_ms=summary_ms(tpot),
        itl_ms=summary_ms([gap for r in results for gap in r.itl_s]),
    )


def print_table(levels: list[LevelResult]) -> None:
    stats = ("ttft_ms", "tpot_ms", "itl_ms")
    header = ["conc", "reqs", "dur_s", "out_tok/s", "req/s"] + [
        f"{s.removesuffix('_ms').upper()} {q} ms" for s in stats for q in ("mean", "p50", "p99")
    ]
    rows = [
        [str(lv.concurrency), str(lv.requests), f"{lv.duration_s:.1f}", f"{lv.output_tokens_per_s:.1f}",
         f"{lv.requests_per_s:.2f}"]
        + [f"{getattr(lv, s)[q]:.1f}" for s in stats for q in ("mean", "p50", "p99")]
        for lv in levels
    ]  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def launched_server(server_args: list[str], timeout_s: float = 300.0) -> Iterator[str]:
    """`expertflow serve` on a free local port; yields its /v1 base URL, stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    fd, log_path = tempfile.mkstemp(prefix="expertflow-serve-", suffix=".log")
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(
            cmd + server_args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    print(f"launched: {shlex.join(cmd + server_args)} (log: {log_path})")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def benchmark(args: argparse.Namespace, base_url: str) -> list[LevelResult]:
    client = AsyncOpenAI(
        base_url=base_url, api_key=args.api_key or "none", max_retries=0, timeout=600
    )
    card = (await client.models.list()).data[0]
    model = args.model or card.id
    print(f"model: {model} (max_model_len={card.model_extra.get('max_model_len')}), endpoint: {args.endpoint}, "
          f"~{args.input_words} prompt words, {args.output_len} output tokens")  # fmt: skip
    await one_request(client, args, model, "warm up")
    levels = []
    for concurrency in args.concurrency:
        levels.append(await run_level(client, args, model, concurrency))
        print(f"  concurrency {concurrency}: done in {levels[-1].duration_s:.1f} s", flush=True)
    await client.close()
    return levels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="per level (default: max(8, 4 x concurrency))"
    )
    parser.add_argument("--input-words", type=int, default=64, help="words per synthetic prompt")
    parser.add_argument("--output-len", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument(
        "--launch", action="store_true", help="start `expertflow serve` for the run"
    )
    parser.add_argument(
        "--server-args", default="", help="flags for the launched server, one string"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    with contextlib.ExitStack() as stack:
        base_url = (
            stack.enter_context(launched_server(shlex.split(args.server_args)))
            if args.launch
            else args.base_url
        )
        levels = asyncio.run(benchmark(args, base_url))
    print_table(levels)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "levels": [asdict(lv) for lv in levels]}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
