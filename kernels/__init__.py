"""Compute kernels: the fused MoE over expert cache slots (Triton on CUDA, torch on the CPU)."""

from kernels.fused_moe import fused_moe

__all__ = ["fused_moe"]
