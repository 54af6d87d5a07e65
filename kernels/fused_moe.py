"""`fused_moe`: the MoE expert computation every model family calls, over cache slots.

Picks the Triton kernels on CUDA and the torch path on the CPU. Triton is imported only when the
Triton backend is first used, so `import kernels` works where triton is not installed.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from kernels.gating import SILU, Gating
from kernels.moe_config import get_config
from kernels.moe_torch import fused_moe_torch

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_backend() -> ModuleType | None:
    """kernels.moe_triton, or None when triton cannot be imported."""
    try:
        from kernels import moe_triton
    except ImportError:
        return None
    return moe_triton


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    gating: Gating = SILU,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    w13_zero: torch.Tensor | None = None,
    w2_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed-expert output for each token, reading expert weights by slot.

    out[t] = sum_j topk_weights[t, j] * (w2[s] @ gating(w13[s, :I] @ x, w13[s, I:] @ x) + b2[s]),
    with s = topk_ids[t, j], x = hidden[t] and b13[s] added to w13[s] @ x (biases: gpt-oss).

    hidden [T, H]; w13 [S, 2I, H] (rows 0..I-1 gate, I..2I-1 up); w2 [S, H, I];
    topk_weights [T, k] float; topk_ids [T, k] int slot ids in [0, S) (any subset, any order,
    repeats allowed; not range-checked, which would cost a device sync).
    backend: "triton", "torch", or "auto" (triton on CUDA when importable, else torch).
    out: optional [T, H] tensor on hidden's device that receives the result (every row is
    written; it may be hidden itself), of hidden's dtype or float32 (unrounded: a layer computed
    in several calls adds them up and rounds once); a new one of hidden's dtype when None.
    b13 [S, 2I], b2 [S, H]: optional biases, both or neither, of hidden's dtype, each row
    contiguous.
    gating: the activation (SiLU unless the family says otherwise).
    w13_scale [S, 2I, H/32], w2_scale [S, H, I/32]: given, w13 [S, 2I, H/32, 16] and
    w2 [S, H, I/32, 16] are MXFP4 blocks (kernels/mxfp4.py), decoded as they are read.
    w13_zero [S, 2I, H/g], w2_zero [S, H, I/g] uint8, with scales of that shape: w13 [S, 2I, H/2]
    and w2 [S, H, I/2] are grouped 4-bit integers (kernels/int4.py), decoded as they are read.
    Returns the output.
    """
    num_tokens, hidden_size = hidden.shape
    num_slots, two_inter = w13.shape[:2]
    top_k = topk_ids.shape[1]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_weights(w13, w2, w13_scale, w2_scale, w13_zero, w2_zero, hidden)
    zeros = None if w13_zero is None or w2_zero is None else (w13_zero, w2_zero)
    if topk_ids.shape != (num_tokens, top_k) or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_weights must be [{num_tokens}, k], "
            f"got {tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        )
    if (b13 is None) != (b2 is None) or (
        b13 is not None
        and b2 is not None
        and (b13.shape != (num_slots, two_inter) or b2.shape != (num_slots, hidden_size))
    ):
        raise ValueError(f"b13 and b2 must both be given, [S, {two_inter}] and [S, {hidden_size}]")
    if b13 is not None and b2 is not None and (b13.stride(-1) != 1 or b2.stride(-1) != 1):
        raise ValueError("b13 and b2 rows must be contiguous")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if out is None:
        out = torch.empty_like(hidden)  # [T, H]
    elif (
        out.shape != hidden.shape
        or out.dtype not in (hidden.dtype, torch.float32)
        or out.device != hidden.device
    ):
        raise ValueError(
            f"out must be {tuple(hidden.shape)} {hidden.dtype} or float32 on {hidden.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if num_tokens == 0:
        return out

    # Triton is imported only when it would run: an "auto" call on the CPU must not decorate
    # the kernels before a test session sets TRITON_INTERPRET.
    wants_triton = backend == "triton" or (backend == "auto" and hidden.device.type == "cuda")
    impl = triton_backend() if wants_triton else None
    if backend == "triton" and impl is None:
        raise RuntimeError("backend='triton' needs the triton package: pip install 'triton>=3.0'")
    scales = None if w13_scale is None or w2_scale is None else (w13_scale, w2_scale)
    if impl is None:
        return fused_moe_torch(
            hidden, w13, w2, topk_weights, topk_ids, out, b13, b2, gating, scales, zeros
        )
    config = get_config(num_tokens, hidden_size, two_inter // 2, top_k, hidden.dtype, hidden.device)
    return impl.fused_moe_triton(
        hidden, w13, w2, topk_weights, topk_ids, out, config, b13, b2, gating, scales, zeros
    )


def _check_weights(
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    w13_zero: torch.Tensor | None,
    w2_zero: torch.Tensor | None,
    hidden: torch.Tensor,
) -> None:
    """Weights of hidden's dtype, w13 [S, 2I, H] and w2 [S, H, I]; or MXFP4 blocks and scales;
    or grouped 4-bit integers, scales and zero points."""
    num_slots, two_inter, hidden_size = w13.shape[0], w13.shape[1], hidden.shape[1]
    inter = two_inter // 2
    zeros = None if w13_zero is None or w2_zero is None else (w13_zero, w2_zero)
    if (w13_scale is None) != (w2_scale is None) or (zeros is not None and w13_scale is None):
        raise ValueError("w13_scale and w2_scale come together (MXFP4 or 4-bit weights)")
    if (w13_zero is None) != (w2_zero is None):
        raise ValueError("w13_zero and w2_zero come together (4-bit weights)")
    if w13_scale is None:
        shapes = ((num_slots, two_inter, hidden_size), (num_slots, hidden_size, inter))
        dtype, layout = hidden.dtype, f"w13 [S, 2I, {hidden_size}] and w2 [S, {hidden_size}, I]"
    elif zeros is not None:
        assert w2_scale is not None
        shapes = ((num_slots, two_inter, hidden_size // 2), (num_slots, hidden_size, inter // 2))
        dtype, layout = torch.uint8, "4-bit w13 [S, 2I, H/2] and w2 [S, H, I/2]"
        for scale, zero, (rows, cols) in zip(
            (w13_scale, w2_scale),
            zeros,
            ((two_inter, hidden_size), (hidden_size, inter)),
            strict=True,
        ):
            groups = scale.shape[-1]
            if scale.dim() != 3 or scale.shape[:2] != (num_slots, rows) or cols % max(groups, 1):
                raise ValueError(
                    f"4-bit scales must be [{num_slots}, {rows}, groups dividing {cols}], got "
                    f"{tuple(scale.shape)}"
                )
            if not scale.dtype.is_floating_point:
                raise ValueError(f"4-bit scales must be floats, got {scale.dtype}")
            if (
                zero.shape != scale.shape
                or zero.dtype != torch.uint8
                or zero.stride() != scale.stride()
            ):
                raise ValueError("4-bit zero points must be uint8, laid out as their scales")
    else:
        shapes = (
            (num_slots, two_inter, hidden_size // 32, 16),
            (num_slots, hidden_size, inter // 32, 16),
        )
        dtype, layout = torch.uint8, "MXFP4 blocks w13 [S, 2I, H/32, 16] and w2 [S, H, I/32, 16]"
        assert w2_scale is not None
        if w13_scale.shape != shapes[0][:3] or w2_scale.shape != shapes[1][:3]:
            raise ValueError(f"expected scales {shapes[0][:3]} and {shapes[1][:3]}")
        if w13_scale.dtype != torch.uint8 or w2_scale.dtype != torch.uint8:
            raise ValueError("MXFP4 scales must be uint8 (e8m0)")
    if (tuple(w13.shape), tuple(w2.shape)) != shapes:
        raise ValueError(f"expected {layout}, got {tuple(w13.shape)} and {tuple(w2.shape)}")
    if w13.dtype != dtype or w2.dtype != dtype:
        raise ValueError(f"weights must be {dtype}, got {w13.dtype} and {w2.dtype}")
