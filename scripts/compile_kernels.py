"""Compile the Triton fused-MoE kernel ahead of time for CUDA architectures, on any machine.

Triton lowers the kernel to PTX and assembles it with the ptxas its wheel ships: no GPU or driver
is needed. Every variant the server launches is built (compute dtype x expert format x the
default tile configs, gate/up and down) and reported with the shared memory it needs against what
a block may have on that architecture, and the registers and spills ptxas reports. A config that
needs more shared memory than the GPU has fails at its first launch; the server then shrinks it
(`kernels.moe_config.smaller`), and so does this check, reporting what runs. The exit status is 1
when a variant fails to compile or nothing shrunk fits. CI runs it, so a kernel that only the CPU
interpreter accepts, or a tile config that cannot run on a supported GPU, does not land.

usage: python scripts/compile_kernels.py [--arch 80 --arch 89 --arch 90] [--dtype bfloat16]
       [--no-registers]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)  # compile the kernel, do not interpret it

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kernels.gating import SILU, Gating  # noqa: E402
from kernels.moe_config import default_config, smaller  # noqa: E402
from kernels.moe_triton import Launch, _moe_gemm_kernel, plan  # noqa: E402

# Shared memory a block may use (the opt-in maximum), by compute capability: A100, RTX 30xx,
# RTX 40xx / L4 / L40, H100 / H200.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
FORMATS = ("plain", "bias", "mxfp4", "int4")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TIERS = (16, 256, 4096)  # token counts that pick each default tile config


def launches(
    dtype: torch.dtype, weights: str, config: dict[str, int], hidden: int = 256, inter: int = 128
) -> list[Launch]:
    """The two launches of one fused_moe call on small CPU tensors of the variant's layout."""
    slots, tokens, top_k = 4, 8, 2
    x = torch.zeros(tokens, hidden, dtype=dtype)
    topk_ids = torch.arange(tokens * top_k).view(tokens, top_k) % slots
    topk_weights = torch.ones(tokens, top_k)
    out = torch.empty_like(x)
    extra: dict[str, object] = {}
    if weights == "mxfp4":  # blocks of 32 values in 16 bytes, a uint8 scale each
        w13 = torch.zeros(slots, 2 * inter, hidden // 32, 16, dtype=torch.uint8)
        w2 = torch.zeros(slots, hidden, inter // 32, 16, dtype=torch.uint8)
        extra = dict(scales=(w13[..., 0].contiguous(), w2[..., 0].contiguous()))  # as slots hold
    elif weights == "int4":  # two values a byte, float16 scales and uint8 zeros per 32 inputs
        w13 = torch.zeros(slots, 2 * inter, hidden // 2, dtype=torch.uint8)
        w2 = torch.zeros(slots, hidden, inter // 2, dtype=torch.uint8)
        shapes = ((slots, 2 * inter, hidden // 32), (slots, hidden, inter // 32))
        extra = dict(
            scales=tuple(torch.ones(s, dtype=torch.float16) for s in shapes),
            zeros=tuple(torch.zeros(s, dtype=torch.uint8) for s in shapes),
        )
    else:
        w13 = torch.zeros(slots, 2 * inter, hidden, dtype=dtype)
        w2 = torch.zeros(slots, hidden, inter, dtype=dtype)
    if weights == "bias":  # gpt-oss: biases and its clamped gating
        extra = dict(
            b13=torch.zeros(slots, 2 * inter, dtype=dtype),
            b2=torch.zeros(slots, hidden, dtype=dtype),
            gating=Gating(alpha=1.702, limit=7.0, up_offset=1.0),
        )
    extra.setdefault("gating", SILU)
    return plan(x, w13, w2, topk_weights, topk_ids, out, config, **extra)[0]  # type: ignore[arg-type]


def compile_launch(launch: Launch, arch: int) -> triton.compiler.CompiledKernel:
    """Compile `launch` for sm_`arch` as Triton's JIT would at that launch: the same binder
    specializes its arguments (an int equal to 1, a unit stride, becomes a constant; pointers
    and ints divisible by 16 are marked aligned, which vectorizes loads and sets how deep they
    pipeline), so shared memory, registers and spills are the launched kernel's."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = _moe_gemm_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constants)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, options, bound, specialization, options
    )
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """Registers a thread and bytes of spill stores, as ptxas reports them."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        command = [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", file.name, "-o", os.devnull]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))  # type: ignore[union-attr]
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))  # type: ignore[union-attr]
    return registers, spills


def check(
    arch: int, dtype: torch.dtype, weights: str, config: dict[str, int], registers: bool
) -> bool:
    """Print a row per kernel of the variant; whether both compiled and fit. As the server does,
    a config one of the two kernels cannot fit is shrunk for both (`smaller`)."""
    limit, fitted = SHARED_LIMIT[arch], config
    tiles = "{BLOCK_M},{BLOCK_N},{BLOCK_K} / {num_warps} / {num_stages}".format(**config)
    row = f"| {arch} | {str(dtype)[6:]} | {weights} | {tiles} "
    try:
        compiled = [compile_launch(launch, arch) for launch in launches(dtype, weights, config)]
        while max(k.metadata.shared for k in compiled) > limit:
            fitted = smaller(fitted)
            if fitted is None:
                break
            compiled = [compile_launch(launch, arch) for launch in launches(dtype, weights, fitted)]
    except Exception as exc:  # any compile error fails the check
        print(f"{row}| both | - | - | - | FAILED: {str(exc).splitlines()[0]} |")
        return False
    if fitted is None:
        status = "TOO MUCH SHARED MEMORY"
    elif fitted is config:
        status = "ok"
    else:
        status = "ok as {BLOCK_M},{BLOCK_N},{BLOCK_K} / {num_stages} stages".format(**fitted)
    for kernel, binary in zip(("gate/up", "down"), compiled, strict=True):
        shared = f"{binary.metadata.shared / 1024:.0f} ({limit / 1024:.0f})"
        regs, spills = ptxas_report(binary.asm["ptx"], arch) if registers else ("-", "-")
        print(f"{row}| {kernel} | {shared} | {regs} | {spills} | {status} |")
    return fitted is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtype", action="append", choices=[str(d)[6:] for d in DTYPES])
    parser.add_argument("--no-registers", action="store_true", help="skip ptxas's register report")
    args = parser.parse_args()
    dtypes = [getattr(torch, name) for name in args.dtype] if args.dtype else DTYPES
    print("| sm | dtype | experts | tiles M,N,K / warps / stages | kernel | shared KiB (limit) "
          "| registers | spill bytes | |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for arch in args.arch or [80, 89, 90]:
        for dtype in dtypes:
            for weights in FORMATS:
                for tier in TIERS:
                    config = default_config(tier)
                    failed += not check(arch, dtype, weights, config, not args.no_registers)
    print(f"\n{failed} variants failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
