"""Kernel tests run the Triton kernel on CPU tensors through triton's interpreter.

triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when `kernels.moe_triton` is first
imported, so the variable is set here, while pytest collects this folder and before any kernel
test imports the module. Nothing outside these tests imports it on a CPU-only machine:
`fused_moe(backend="auto")` runs the torch path there without importing triton. On a CUDA
machine the variable is left unset so the `gpu` tests run compiled kernels; run the interpreter
tests there with `TRITON_INTERPRET=1 pytest tests/kernels`.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
