"""Tile configs for the Triton fused MoE kernels: tuned JSON tables with in-code defaults.

A table file maps token counts M to one config each and is keyed by what the kernel sees at a
call: hidden size H, intermediate size I, top-k, dtype and GPU name. The slot-pool size S is not in
the key because it depends on the deployment's cache size, not on the layer's shapes.
`benchmarks/tune_fused_moe.py` measures and writes these files; without one the defaults below
apply (sensible, not measured).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def device_name(device: torch.device) -> str:
    """GPU name as it appears in config file names ("cpu" for the Triton interpreter)."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_file_name(hidden: int, inter: int, top_k: int, dtype: torch.dtype, device: str) -> str:
    """E.g. `H=2048,I=768,k=8,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json`."""
    return f"H={hidden},I={inter},k={top_k},device_name={device},dtype={dtype_name(dtype)}.json"


def default_config(m: int) -> dict[str, int]:
    """Untuned fallback: small M tiles for decode (few tokens per slot), wide tiles for prefill.
    Untimed (no GPU yet), but picked so that, by ptxas, no half-precision variant spills
    registers on sm_80, sm_89 or sm_90 (scripts/compile_kernels.py): with a K step of 128 at 4
    warps, or of 64 under a 64 x 128 tile, the MXFP4 and 4-bit gate/up kernels, which decode
    their weights inline beside two accumulators, spilled up to 508 bytes."""
    if m <= 32:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    if m <= 512:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4)


def smaller(config: dict[str, int]) -> dict[str, int] | None:
    """The config to try when `config` needs more shared memory than the GPU has (a table tuned
    on a larger GPU, float32 tiles on a 99 KiB one): fewer pipeline stages, then half the K tile,
    then half the N tile; None when nothing is left to shrink."""
    for key, least in (("num_stages", 1), ("BLOCK_K", 16), ("BLOCK_N", 16)):
        if config[key] > least:
            step = config[key] - 1 if key == "num_stages" else config[key] // 2
            return {**config, key: step}
    return None


@functools.cache
def load_table(path: Path) -> dict[int, dict[str, int]] | None:
    """The {M: config} table in `path`, or None when there is no such file."""
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {int(m): {key: int(cfg[key]) for key in CONFIG_KEYS} for m, cfg in raw.items()}


def get_config(
    m: int,
    hidden: int,
    inter: int,
    top_k: int,
    dtype: torch.dtype,
    device: torch.device,
    config_dir: Path = CONFIG_DIR,
) -> dict[str, int]:
    """The tuned config for the nearest tuned M, else the default for M."""
    name = config_file_name(hidden, inter, top_k, dtype, device_name(device))
    table = load_table(config_dir / name)
    if not table:
        return default_config(m)
    return table[min(table, key=lambda tuned_m: (abs(tuned_m - m), tuned_m))]


def save_table(table: dict[int, dict[str, int]], path: Path) -> None:
    """Write a {M: config} table (what the tuning script measured) as sorted, readable JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {str(m): {key: table[m][key] for key in CONFIG_KEYS} for m in sorted(table)}
    path.write_text(json.dumps(body, indent=2) + "\n")
    load_table.cache_clear()
