"""Triton fused MoE over cache slots: align by slot, gate/up GEMM + gated activation, down GEMM.

Each GEMM is one launch over all slots: the (token, k) pairs are sorted by slot and each slot's
run is padded to BLOCK_M, so every M tile belongs to exactly one slot and reads that slot's
weights straight from the pool (a cache hit costs no copy).

Importing this module imports triton. Under TRITON_INTERPRET=1 (read by triton when the kernel
below is decorated, i.e. when this module is first imported) the kernel runs on CPU tensors; the
interpreter does no bfloat16 arithmetic, so an interpreted kernel upcasts tiles to float32 first.
The kernel calls no jitted helpers (tl.zeros, tl.cdiv, tl.sigmoid, own functions) but `_mxfp4`,
on MXFP4 weights only: the interpreter spends milliseconds re-patching triton.language on each
such call, per program.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kernels.gating import SILU, Gating
from kernels.moe_align import align_by_slot
from kernels.moe_config import smaller

logger = logging.getLogger(__name__)


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, weights_ptr, sorted_ids_ptr,
                     block_slots_ptr, num_padded_ptr, max_padded, num_pairs, N, K,
                     stride_am, stride_ak, stride_bs, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_bias_s, scale_ptr, stride_ss, stride_sn, stride_sk, zero_ptr,
                     MXFP4: tl.constexpr, INT4: tl.constexpr, GROUP_K: tl.constexpr,
                     PAIRS_PER_A_ROW: tl.constexpr, GATED: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr,
                     UP_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of c[pair, n] over the pairs of one slot s.

    GATED (gate/up):  c[pair, n] = act(g) * (u + UP_OFFSET), g = a[row] . b[s, n] + bias[s, n],
                      u = a[row] . b[s, N + n] + bias[s, N + n], act(g) = g * sigmoid(ALPHA * g),
                      g clamped to <= LIMIT and u to +-LIMIT when LIMIT > 0 (`Gating`)
    else (down):      c[pair, n] = weights[pair] * (a[row] . b[s, n] + bias[s, n])
    with row = pair // PAIRS_PER_A_ROW (the token for gate/up, the pair itself for down); the
    biases only when HAS_BIAS. MXFP4: b holds bytes [S, rows, K/2] with scales [S, rows, K/32],
    decoded tile by tile as they are read (`_mxfp4`). INT4: b holds bytes [S, rows, K/2] of
    4-bit integers with scales and uint8 zero points [S, rows, K/GROUP_K] (one layout), decoded
    inline as (q - zero) * scale.
    """
    # int64 index math: slot pools pass 2**31 elements, and the interpreter skips overflow checks
    pid = tl.program_id(0).to(tl.int64)
    num_pid_m = (max_padded + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_pid_n  # GROUP_M M tiles share one sweep over N for L2 reuse
    first_m = (pid // group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    if pid_m * BLOCK_M < tl.load(num_padded_ptr):  # tiles past the padded length have no work
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rows_ok = pairs < num_pairs  # [BM] padding rows hold num_pairs
        slot = tl.load(block_slots_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        a_ptrs = (
            a_ptr + (pairs // PAIRS_PER_A_ROW)[:, None] * stride_am + offs_k[None, :] * stride_ak
        )
        b_ptrs = (
            b_ptr + slot * stride_bs + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        )
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
            k_ok = offs_k < K - k * BLOCK_K
            tile_ok = k_ok[:, None] & cols_ok[None, :]
            a = tl.load(a_ptrs, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            if UPCAST:
                a = a.to(tl.float32)
            if MXFP4:  # this tile's bytes (two values each) and scales, by absolute k
                kk = k * BLOCK_K + offs_k
                q_ptrs = b_ptr + slot * stride_bs + (kk // 2)[:, None] * stride_bk
                q_ptrs += offs_n[None, :] * stride_bn
                s_ptrs = scale_ptr + slot * stride_ss + (kk // 32)[:, None] * stride_sk
                s_ptrs += offs_n[None, :] * stride_sn
                shift = ((kk % 2) * 4)[:, None]  # the lower nibble holds the even k
                b = _mxfp4(
                    tl.load(q_ptrs, mask=tile_ok, other=0),
                    tl.load(s_ptrs, mask=tile_ok, other=127),
                    shift,
                ).to(a.dtype)  # [BK, BN]
                if GATED:
                    up = _mxfp4(
                        tl.load(q_ptrs + N * stride_bn, mask=tile_ok, other=0),
                        tl.load(s_ptrs + N * stride_sn, mask=tile_ok, other=127),
                        shift,
                    ).to(a.dtype)
            elif INT4:  # this tile's bytes, and their groups' scales and zero points
                kk = k * BLOCK_K + offs_k
                q_ptrs = b_ptr + slot * stride_bs + (kk // 2)[:, None] * stride_bk
                q_ptrs += offs_n[None, :] * stride_bn
                g_offs = slot * stride_ss + (kk // GROUP_K)[:, None] * stride_sk
                g_offs += offs_n[None, :] * stride_sn
                shift = ((kk % 2) * 4)[:, None]  # the lower nibble holds the even k
                q = (tl.load(q_ptrs, mask=tile_ok, other=0).to(tl.int32) >> shift) & 15
                z = tl.load(zero_ptr + g_offs, mask=tile_ok, other=0).to(tl.int32)
                s = tl.load(scale_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32)
                b = ((q - z).to(tl.float32) * s).to(a.dtype)  # [BK, BN]
                if GATED:
                    q = (
                        tl.load(q_ptrs + N * stride_bn, mask=tile_ok, other=0).to(tl.int32) >> shift
                    ) & 15
                    z = tl.load(zero_ptr + g_offs + N * stride_sn, mask=tile_ok, other=0).to(
                        tl.int32
                    )
                    s = tl.load(scale_ptr + g_offs + N * stride_sn, mask=tile_ok, other=0.0).to(
                        tl.float32
                    )
                    up = ((q - z).to(tl.float32) * s).to(a.dtype)
            else:
                b = tl.load(b_ptrs, mask=tile_ok, other=0.0).to(a.dtype)  # [BK, BN]
                if GATED:
                    up = tl.load(b_ptrs + N * stride_bn, mask=tile_ok, other=0.0).to(a.dtype)
                b_ptrs += BLOCK_K * stride_bk
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if GATED:
                acc_up = tl.dot(a, up, acc_up, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        if HAS_BIAS:
            bias_ptrs = bias_ptr + slot * stride_bias_s + offs_n
            acc += tl.load(bias_ptrs, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                up_bias = tl.load(bias_ptrs + N, mask=cols_ok, other=0.0).to(tl.float32)
                acc_up += up_bias[None, :]
        if GATED:
            if LIMIT > 0:
                acc = tl.where(acc > LIMIT, LIMIT, acc)
                acc_up = tl.where(acc_up > LIMIT, LIMIT, tl.where(acc_up < -LIMIT, -LIMIT, acc_up))
            acc = acc / (1.0 + tl.exp(-ALPHA * acc)) * (acc_up + UP_OFFSET)
        else:
            acc *= tl.load(weights_ptr + pairs, mask=rows_ok, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rows_ok[:, None] & cols_ok[None, :])


@triton.jit
def _mxfp4(byte, scale, shift):
    """MXFP4 bytes, their blocks' scales (uint8, same shape) and each value's nibble shift -> the
    float32 values: e2m1 (sign, two exponent bits, one mantissa bit) times 2**(scale - 127)."""
    nibble = (byte.to(tl.int32) >> shift) & 15
    exponent = (nibble >> 1) & 3
    mantissa = (nibble & 1).to(tl.float32)
    magnitude = tl.where(
        exponent == 0, 0.5 * mantissa, (2.0 + mantissa) * (1 << exponent).to(tl.float32) * 0.25
    )
    value = tl.where(nibble >= 8, -magnitude, magnitude)
    power = (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2**(scale - 127), exactly
    return value * power


# triton.jit returned an interpreted function iff TRITON_INTERPRET was set at import.
INTERPRET = not isinstance(_moe_gemm_kernel, triton.runtime.JITFunction)


# (device, dtypes, expert format, tile config) -> the smaller config that fitted the GPU's memory
_fitted: dict[tuple[object, ...], dict[str, int]] = {}


@dataclass(frozen=True)
class Launch:
    """One launch of `_moe_gemm_kernel`: its grid, its positional arguments, and its constexprs
    with the compile options (num_warps, num_stages) as keywords."""

    grid: tuple[int]
    args: tuple[object, ...]
    constants: dict[str, object]


def fused_moe_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    config: dict[str, int],
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    gating: Gating = SILU,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    zeros: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write sum_k topk_weights * expert_slot(hidden) into out [T, H] with the given tile config;
    with `scales` (w13's, w2's) the weights are MXFP4 blocks, with `zeros` too grouped 4-bit
    integers."""
    if hidden.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
            "kernels.moe_triton is first imported"
        )
    variant = (hidden.device, hidden.dtype, w13.dtype, b13 is None, scales is None, zeros is None)
    key = (*variant, tuple(config.items()))
    config = _fitted.get(key, config)
    while True:
        launches, y = plan(hidden, w13, w2, topk_weights, topk_ids, out, config, b13, b2, gating,
                           scales, zeros, upcast=INTERPRET)  # fmt: skip
        try:
            for launch in launches:
                _moe_gemm_kernel[launch.grid](*launch.args, **launch.constants)
            break
        except OutOfResources as exc:  # before that launch ran; the retry redoes both
            fallback = smaller(config)
            if fallback is None:
                raise
            logger.warning("fused MoE tiles %s: %s; using %s", config, exc, fallback)
            config = _fitted[key] = fallback
    if y is not out:
        out.copy_(y.view(*hidden.shape[:1], topk_ids.shape[1], -1).sum(dim=1))
    return out


def plan(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    config: dict[str, int],
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    gating: Gating = SILU,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    zeros: tuple[torch.Tensor, torch.Tensor] | None = None,
    upcast: bool = False,
) -> tuple[list[Launch], torch.Tensor]:
    """The gate/up and down launches of `fused_moe_triton` (`upcast`: tiles to float32, as the
    interpreter needs), and the float32 [P, H] tensor the second writes (`out` itself for top-1
    into a float32 out). scripts/compile_kernels.py compiles these ahead of time."""
    (num_tokens, hidden_size), top_k = hidden.shape, topk_ids.shape[1]
    num_slots, inter = w13.shape[0], w13.shape[1] // 2
    num_pairs = num_tokens * top_k
    bm, bn, bk, group_m = (config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    flags = dict(UPCAST=upcast, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32")
    sorted_ids, block_slots, num_padded = align_by_slot(topk_ids, bm, num_slots)
    max_padded = sorted_ids.numel()
    route_w = topk_weights.reshape(-1).contiguous()  # [P]
    act = hidden.new_empty(num_pairs, inter)  # [P, I]
    # One float32 row per pair (with top-1 into a float32 out itself); the top-k sum follows and
    # is rounded once by torch, as on the torch path, whether out is float32 or not.
    direct = top_k == 1 and out.dtype == torch.float32
    y = out if direct else out.new_empty(num_pairs, hidden_size, dtype=torch.float32)  # [P, H]
    tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, **flags, **launch)
    has_bias = b13 is not None and b2 is not None
    bias13, bias2 = (b13, b2) if has_bias else (route_w, route_w)  # unread without biases
    act_flags = dict(
        HAS_BIAS=has_bias, ALPHA=gating.alpha, LIMIT=gating.limit or 0.0, UP_OFFSET=gating.up_offset
    )
    s13, s2 = scales or (route_w[None, None], route_w[None, None])  # unread without scales
    z13, z2 = zeros or (s13, s2)  # unread without zero points
    int4 = zeros is not None
    packed = dict(MXFP4=scales is not None and not int4, INT4=int4)
    if scales is not None:  # bytes [S, rows, K/2]: two values each
        w13, w2 = w13.flatten(2), w2.flatten(2)
    group13 = hidden_size // s13.shape[2] if int4 else 1  # input channels a scale
    group2 = inter // s2.shape[2] if int4 else 1
    gate_up = Launch(
        (triton.cdiv(max_padded, bm) * triton.cdiv(inter, bn),),
        (hidden, w13, act, bias13, route_w, sorted_ids, block_slots, num_padded, max_padded,
         num_pairs, inter, hidden_size, *hidden.stride(), *w13.stride(), *act.stride(),
         bias13.stride(0), s13, *s13.stride(), z13),
        dict(GROUP_K=group13, PAIRS_PER_A_ROW=top_k, GATED=True, **packed, **act_flags, **tiles),
    )  # fmt: skip
    down = Launch(
        (triton.cdiv(max_padded, bm) * triton.cdiv(hidden_size, bn),),
        (act, w2, y, bias2, route_w, sorted_ids, block_slots, num_padded, max_padded, num_pairs,
         hidden_size, inter, *act.stride(), *w2.stride(), *y.stride(), bias2.stride(0),
         s2, *s2.stride(), z2),
        dict(GROUP_K=group2, PAIRS_PER_A_ROW=1, GATED=False, **packed, **act_flags, **tiles),
    )  # fmt: skip
    return [gate_up, down], y
