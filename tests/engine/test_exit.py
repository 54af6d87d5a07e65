"""A process that ends while our threads are busy exits cleanly.

Python's finalization stops a daemon thread the moment it next takes the GIL; one inside a torch op
(which releases the GIL) is then unwound through C++ frames that cannot unwind, and the process
aborts with "terminate called without an active exception". So the link and engine threads must be
stopped at exit, before finalization, each in its own process here."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUSY_LINK = """
import torch
from engine.offload.transfer import LOW, TransferEngine

link = TransferEngine(torch.device("cpu"))
src = torch.randn(2048, 2048)
queued = [link.submit([(torch.empty_like(src), src)], LOW) for _ in range(64)]
while not queued[0].done.is_set():
    pass
"""  # leaves with copies queued and one running

BUSY_ENGINE = """
import asyncio, sys, threading, time
from engine import AsyncLLM, EngineConfig, SamplingParams

llm = AsyncLLM(EngineConfig(model=sys.argv[1], max_model_len=512), model_name="tiny")
params = SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)
first = threading.Event()

async def generate(i):
    async for _ in llm.generate([1 + i, 2, 3], params, f"r{i}"):
        first.set()

async def main():
    await asyncio.gather(*(generate(i) for i in range(8)))

threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()
first.wait(60)
time.sleep(0.3)
"""  # leaves with eight requests decoding, never shut down


def exit_cleanly(script: str, *args: str) -> None:
    for attempt in range(3):  # an abort is likely, not certain, without the fix: try a few times
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (attempt, done.returncode, done.stderr[-2000:])


def test_a_process_leaving_with_copies_on_the_link_exits_cleanly() -> None:
    exit_cleanly(BUSY_LINK)


def test_a_process_leaving_with_the_async_engine_mid_step_exits_cleanly(
    mixtral_checkpoint: Path,
) -> None:
    exit_cleanly(BUSY_ENGINE, str(mixtral_checkpoint))
