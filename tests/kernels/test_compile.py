"""The Triton kernel compiled ahead of time for real GPUs by scripts/compile_kernels.py, with the
ptxas Triton's wheel ships (no GPU needed): every expert format and default tile config for
Hopper in bfloat16, and float32's for the 99 KiB of shared memory of an RTX 40xx, where the
server has to shrink some tiles."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compile_kernels.py"
HAS_NVIDIA_BACKEND = importlib.util.find_spec("triton") is not None and (
    importlib.util.find_spec("triton.backends.nvidia") is not None
)


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton with its CUDA backend")
@pytest.mark.parametrize(("arch", "dtype"), [(90, "bfloat16"), (89, "float32")])
def test_every_variant_compiles_within_the_gpus_shared_memory(arch: int, dtype: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(SCRIPT), f"--arch={arch}", f"--dtype={dtype}", "--no-registers"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(f"| {arch} |")]
    assert len(rows) == 24 and all("| ok" in row for row in rows)  # 4 formats x 3 tiers x 2
