"""kernels.fused_moe (torch path, Triton kernel) against a float64 reference.

The Triton cases run interpreted on the CPU (see conftest.py) and compiled on a GPU (`gpu`).
Every run writes into an output poisoned with NaN, so a row the kernel skips fails the check.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_moe
from kernels.gating import SILU, Gating
from kernels.int4 import dequantize_int4, pack_int4
from kernels.moe_align import align_by_slot
from kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4

dispatch = importlib.import_module(
    "kernels.fused_moe"
)  # the module; `kernels.fused_moe` is the function
moe_triton = dispatch.triton_backend()  # imported after conftest.py set TRITON_INTERPRET
CUDA = torch.cuda.is_available()
INTERPRETED = moe_triton is not None and moe_triton.INTERPRET
COMPILED = moe_triton is not None and not moe_triton.INTERPRET and CUDA

HIDDEN, INTER, SLOTS = 70, 46, 64  # not multiples of any tile size; slots mostly unused
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SHAPES = [(1, 8), (3, 2), (64, 4), (257, 1), (257, 8)]  # (T, k)

interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs triton and TRITON_INTERPRET=1")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not COMPILED, reason="needs CUDA and compiled triton")]
TRITON_DEVICES = [
    pytest.param("cpu", id="cpu-interpret", marks=interpreted),
    pytest.param("cuda", id="cuda", marks=gpu),
]
TARGETS = [  # (device, backend)
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param("cpu", "triton", id="cpu-triton-interpret", marks=interpreted),
    pytest.param("cuda", "triton", id="cuda-triton", marks=gpu),
    pytest.param("cuda", "torch", id="cuda-torch", marks=gpu),
]


def make_inputs(
    num_tokens: int, top_k: int, dtype: torch.dtype, device: str, seed: int
) -> tuple[torch.Tensor, ...]:
    """Random layer over a slot pool; rows route to distinct slots drawn from a shuffled subset."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=gen)  # [T, H]
    w13 = torch.randn(SLOTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5  # [S, 2I, H]
    w2 = torch.randn(SLOTS, HIDDEN, INTER, generator=gen) / INTER**0.5  # [S, H, I]
    used = torch.randperm(SLOTS, generator=gen)[: max(top_k, SLOTS // 3)]  # non-contiguous ids
    pick = torch.rand(num_tokens, used.numel(), generator=gen).argsort(dim=1)[:, :top_k]
    topk_ids = used[pick].to(torch.int32)  # [T, k]
    topk_weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1  # [T, k]
    tensors = (hidden.to(dtype), w13.to(dtype), w2.to(dtype), topk_weights, topk_ids)
    return tuple(t.to(device) for t in tensors)


def reference(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The MoE formula in float64, per top-k column and chunk of 64 tokens (gathered weights)."""
    x, inter = hidden.double(), w2.shape[2]
    out = torch.zeros_like(x)  # [T, H]
    for j in range(topk_ids.shape[1]):
        for rows in torch.arange(x.shape[0], device=x.device).split(64):
            ids = topk_ids[rows, j].long()  # [t]
            gate_up = torch.einsum("tnh,th->tn", w13[ids].double(), x[rows])  # [t, 2I]
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [t, I]
            down = torch.einsum("thi,ti->th", w2[ids].double(), act)  # [t, H]
            out[rows] += topk_weights[rows, j, None].double() * down
    return out


def check(inputs: tuple[torch.Tensor, ...], backend: str, **kwargs) -> None:
    hidden = inputs[0]
    out = torch.full_like(hidden, float("nan"))  # poison: unwritten rows fail
    result = fused_moe(*inputs, backend=backend, out=out, **kwargs)
    assert result is out
    ref = reference(*inputs)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[hidden.dtype], f"relative error {err:.2e} (NaN: unwritten rows)"


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(("num_tokens", "top_k"), SHAPES)
def test_matches_reference(device, backend, dtype, num_tokens, top_k):
    check(make_inputs(num_tokens, top_k, dtype, device, seed=num_tokens * 10 + top_k), backend)


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_same_slot_twice_in_a_row(device, backend, dtype):
    inputs = list(make_inputs(5, 4, dtype, device, seed=7))
    inputs[4] = torch.tensor(
        [[9, 9, 3, 9], [3, 9, 9, 40], [40, 40, 40, 40], [0, 63, 0, 63], [17, 5, 17, 5]],
        dtype=torch.int64,
        device=device,
    )
    check(tuple(inputs), backend)


@pytest.mark.parametrize(("device", "backend"), TARGETS)
def test_zero_tokens(device, backend):
    hidden, w13, w2, weights, ids = make_inputs(0, 2, torch.float32, device, seed=0)
    out = fused_moe(hidden, w13, w2, weights, ids, backend=backend)
    assert out.shape == (0, HIDDEN) and out.dtype == hidden.dtype


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_in_place_into_hidden(device, backend, top_k):
    inputs = make_inputs(3, top_k, torch.float32, device, seed=4)
    ref = reference(*inputs)
    out = fused_moe(*inputs, backend=backend, out=inputs[0])
    assert out is inputs[0]
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= TOL[torch.float32]


@pytest.mark.parametrize(("device", "backend"), TARGETS)
def test_allocates_output_when_none_given(device, backend):
    inputs = make_inputs(3, 2, torch.bfloat16, device, seed=3)
    out = fused_moe(*inputs, backend=backend)
    assert out.dtype == torch.bfloat16 and out.shape == (3, HIDDEN)
    ref = reference(*inputs)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= TOL[torch.bfloat16]


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("top_k", [1, 4])
def test_float32_out_adds_up_split_calls_unrounded(device, backend, top_k):
    """A layer run in two calls (half of each token's experts each) into float32 outputs sums to
    the one-call result rounded once: what resident-first, streaming and host compute rely on."""
    hidden, w13, w2, weights, ids = make_inputs(9, top_k, torch.bfloat16, device, seed=11)
    whole = fused_moe(hidden, w13, w2, weights, ids, backend=backend)  # bf16, rounded once
    halves = torch.zeros(hidden.shape, dtype=torch.float32, device=device)
    for keep in (slice(0, top_k // 2), slice(top_k // 2, top_k)):
        part_weights = torch.zeros_like(weights)
        part_weights[:, keep] = weights[:, keep]
        out = torch.full(hidden.shape, float("nan"), dtype=torch.float32, device=device)
        halves += fused_moe(hidden, w13, w2, part_weights, ids, backend=backend, out=out)
    torch.testing.assert_close(halves.to(torch.bfloat16), whole, atol=0, rtol=0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_tiny_tiles_cover_every_tile_and_k_step(device):
    """16-wide tiles: several N tiles and K steps per slot, a partial last GROUP_M group."""
    hidden, w13, w2, weights, ids = make_inputs(40, 2, torch.float32, device, seed=11)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=3, num_warps=4, num_stages=2)
    out = torch.full_like(hidden, float("nan"))
    moe_triton.fused_moe_triton(hidden, w13, w2, weights, ids, out, config)
    ref = reference(hidden, w13, w2, weights, ids)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-4


@interpreted
def test_a_config_past_the_gpus_shared_memory_shrinks_once(monkeypatch, caplog):
    """A GPU refuses tiles that need more shared memory than it has (Triton's OutOfResources, as
    a table tuned on a larger GPU or float32 tiles on a 99 KiB one would): the call retries with
    fewer stages, then smaller tiles, and later calls start from what fitted."""
    kernel, launched = moe_triton._moe_gemm_kernel, []

    class SmallGPU:  # as much shared memory as one stage of 32-wide K tiles
        def __getitem__(self, grid):
            def launch(*args, **constants):
                launched.append((constants["num_stages"], constants["BLOCK_K"]))
                need = constants["num_stages"] * constants["BLOCK_K"]
                if need > 32:
                    raise moe_triton.OutOfResources(need, 32, "shared memory")
                kernel[grid](*args, **constants)

            return launch

    monkeypatch.setattr(moe_triton, "_moe_gemm_kernel", SmallGPU())
    monkeypatch.setattr(moe_triton, "_fitted", {})
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    hidden, w13, w2, weights, ids = make_inputs(8, 2, torch.float32, "cpu", seed=3)
    for _ in range(2):
        out = torch.full_like(hidden, float("nan"))
        moe_triton.fused_moe_triton(hidden, w13, w2, weights, ids, out, dict(config))
        ref = reference(hidden, w13, w2, weights, ids)
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    shrinking = [(3, 64), (2, 64), (1, 64)]  # refused; then both kernels at (1, 32), twice
    assert launched == shrinking + [(1, 32)] * 4
    assert "fused MoE tiles" in caplog.text


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_by_slot_pads_each_slot_run(device, block_m):
    topk_ids = make_inputs(50, 4, torch.float32, device, seed=5)[4]
    sorted_ids, block_slots, num_padded = align_by_slot(topk_ids, block_m, SLOTS)
    num_pairs, flat = topk_ids.numel(), topk_ids.reshape(-1)
    used = int(num_padded)
    assert used % block_m == 0 and (sorted_ids[used:] == num_pairs).all()
    real = sorted_ids[:used][sorted_ids[:used] < num_pairs].long()
    assert sorted(real.tolist()) == list(range(num_pairs))  # each pair exactly once
    for tile in range(used // block_m):
        pairs = sorted_ids[tile * block_m : (tile + 1) * block_m]
        pairs = pairs[pairs < num_pairs].long()
        assert pairs.numel() > 0 and (flat[pairs] == block_slots[tile]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not COMPILED, reason="needs CUDA and compiled triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 64, 1000])
def test_gpu_layer_sized_shapes(dtype, num_tokens):
    """Shapes near real layers, through every default tile config (M = 1, 64, 1000)."""
    gen = torch.Generator().manual_seed(num_tokens)
    hidden_size, inter, slots = 1000, 700, 64  # odd sizes
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    w13 = torch.randn(slots, 2 * inter, hidden_size, generator=gen) / hidden_size**0.5
    w2 = torch.randn(slots, hidden_size, inter, generator=gen) / inter**0.5
    topk_ids = torch.rand(num_tokens, slots, generator=gen).argsort(dim=1)[:, :8]
    topk_weights = torch.rand(num_tokens, 8, generator=gen).softmax(dim=1)
    tensors = (hidden.to(dtype), w13.to(dtype), w2.to(dtype), topk_weights, topk_ids)
    check(tuple(t.cuda() for t in tensors), "triton")


def test_auto_on_cpu_never_imports_triton(monkeypatch):
    def fail() -> None:
        raise AssertionError("auto on CPU must not import triton")

    monkeypatch.setattr(dispatch, "triton_backend", fail)
    check(make_inputs(3, 2, torch.float32, "cpu", seed=1), "auto")


def test_triton_backend_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_backend", lambda: None)
    inputs = make_inputs(3, 2, torch.float32, "cpu", seed=2)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        fused_moe(*inputs, backend="triton")
    check(inputs, "auto")


def test_imports_and_runs_where_triton_is_missing():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "x = torch.randn(2, 8); w13 = torch.randn(4, 6, 8); w2 = torch.randn(4, 8, 3)\n"
        "ids = torch.tensor([[1, 3], [2, 1]]); weights = torch.rand(2, 2)\n"
        "print(kernels.fused_moe(x, w13, w2, weights, ids, backend='auto').shape)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "torch.Size([2, 8])" in run.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(backend="cuda"), "backend must be one of"),
        (dict(w2=torch.zeros(4, 8, 5)), "expected w13"),
        (dict(topk_ids=torch.zeros(3, 2, dtype=torch.long)), "topk_ids and topk_weights"),
        (dict(topk_ids=torch.zeros(2, 2)), "integer"),
        (dict(w13=torch.zeros(4, 6, 8, dtype=torch.float64)), "weights must be"),
        (dict(out=torch.zeros(2, 8, dtype=torch.bfloat16)), "out must be"),
        (dict(out=torch.zeros(2, 8, dtype=torch.float64)), "or float32"),
    ],
)
def test_rejects_bad_arguments(change, message):
    args = dict(
        hidden=torch.randn(2, 8),
        w13=torch.randn(4, 6, 8),
        w2=torch.randn(4, 8, 3),
        topk_weights=torch.rand(2, 2),
        topk_ids=torch.tensor([[1, 3], [2, 1]]),
    )
    with pytest.raises(ValueError, match=message):
        fused_moe(**{**args, **change})


GPT_OSS = Gating(alpha=1.702, limit=7.0, up_offset=1.0)


def reference_biased(hidden, w13, w2, topk_weights, topk_ids, b13, b2, gating) -> torch.Tensor:
    """gpt-oss's expert formula in float64, written as transformers writes it."""
    x, inter = hidden.double(), w2.shape[2]
    out = torch.zeros_like(x)
    for j in range(topk_ids.shape[1]):
        ids = topk_ids[:, j].long()
        gate_up = torch.einsum("tnh,th->tn", w13[ids].double(), x) + b13[ids].double()
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if gating.limit is not None:
            gate, up = gate.clamp(max=gating.limit), up.clamp(-gating.limit, gating.limit)
        act = gate * torch.sigmoid(gate * gating.alpha) * (up + gating.up_offset)
        down = torch.einsum("thi,ti->th", w2[ids].double(), act) + b2[ids].double()
        out += topk_weights[:, j, None].double() * down
    return out


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gating", [SILU, GPT_OSS], ids=["silu", "gpt-oss"])
@pytest.mark.parametrize(("num_tokens", "top_k"), [(3, 2), (64, 4)])
def test_biases_and_gating(device, backend, dtype, gating, num_tokens, top_k):
    """Biases and gpt-oss's clamped gating; activations scaled up so that the clamp binds."""
    hidden, w13, w2, weights, ids = make_inputs(num_tokens, top_k, dtype, device, seed=top_k)
    gen = torch.Generator().manual_seed(1)
    w13 = w13 * 6  # pre-activations well past the limit of 7
    inputs = (hidden, w13, w2, weights, ids)
    b13 = (torch.randn(SLOTS, 2 * INTER, generator=gen) * 3).to(dtype).to(device)
    b2 = torch.randn(SLOTS, HIDDEN, generator=gen).to(dtype).to(device)
    out = torch.full_like(hidden, float("nan"))
    fused_moe(
        hidden, w13, w2, weights, ids, backend=backend, out=out, b13=b13, b2=b2, gating=gating
    )
    ref = reference_biased(hidden, w13, w2, weights, ids, b13, b2, gating)
    if gating.limit is not None:  # the clamp binds
        unclamped = Gating(gating.alpha, None, gating.up_offset)
        assert not torch.allclose(ref, reference_biased(*inputs, b13, b2, unclamped))
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def test_biases_come_in_pairs():
    hidden, w13, w2, weights, ids = make_inputs(3, 2, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="b13 and b2"):
        fused_moe(hidden, w13, w2, weights, ids, b13=torch.zeros(SLOTS, 2 * INTER))


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("num_tokens", "top_k"), [(3, 2), (40, 4)])
def test_mxfp4_weights_decoded_as_read(device, backend, dtype, num_tokens, top_k):
    """MXFP4 slots (gpt-oss's, kept packed): the output of the same weights decoded first. The
    hidden size (64) spans two scale blocks, the intermediate size (96) three, neither a tile."""
    hidden_size, inter, slots = 64, 96, 12
    gen = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    w13, s13 = quantize_mxfp4(torch.randn(slots, 2 * inter, hidden_size, generator=gen) / 8)
    w2, s2 = quantize_mxfp4(torch.randn(slots, hidden_size, inter, generator=gen) / 10)
    decoded = [
        torch.stack([dequantize_mxfp4(b, s, dtype) for b, s in zip(w, sc, strict=True)])
        for w, sc in ((w13, s13), (w2, s2))
    ]  # [S, 2I, H], [S, H, I]
    ids = torch.stack([torch.randperm(slots, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    b13 = torch.randn(slots, 2 * inter, generator=gen).to(dtype)
    b2 = torch.randn(slots, hidden_size, generator=gen).to(dtype)
    on = [t.to(device) for t in (hidden, w13, w2, weights, ids, b13, b2, s13, s2)]
    out = torch.full_like(on[0], float("nan"))
    fused_moe(
        *on[:5], backend=backend, out=out, b13=on[5], b2=on[6], gating=GPT_OSS,
        w13_scale=on[7], w2_scale=on[8],
    )  # fmt: skip
    ref = reference_biased(hidden, *decoded, weights, ids, b13, b2, GPT_OSS)
    err = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def random_int4(
    slots: int, rows: int, cols: int, group: int, gen: torch.Generator, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random 4-bit weights [S, rows, cols/2], scales and zero points [S, rows, cols/group]."""
    q = pack_int4(torch.randint(0, 16, (slots, rows, cols), generator=gen))
    zeros = torch.randint(0, 17, (slots, rows, cols // group), generator=gen).to(torch.uint8)
    scales = (torch.rand(slots, rows, cols // group, generator=gen) / 40 + 0.01).to(scale_dtype)
    return q, scales, zeros


@pytest.mark.parametrize(("device", "backend"), TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("num_tokens", "top_k", "group13", "group2"), [(3, 2, 16, 32), (40, 4, 32, 16)]
)
def test_int4_weights_decoded_as_read(device, backend, dtype, num_tokens, top_k, group13, group2):
    """4-bit slots (GPTQ's, AWQ's, kept packed): the output of the same weights decoded first.
    The hidden size (64) spans several groups, the intermediate size (96) too, neither a tile;
    the two GEMMs' groups differ."""
    hidden_size, inter, slots = 64, 96, 12
    gen = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    w13, s13, z13 = random_int4(slots, 2 * inter, hidden_size, group13, gen, torch.float16)
    w2, s2, z2 = random_int4(slots, hidden_size, inter, group2, gen, torch.bfloat16)
    decoded = [dequantize_int4(w, s, z, dtype) for w, s, z in ((w13, s13, z13), (w2, s2, z2))]
    ids = torch.stack([torch.randperm(slots, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    on = [t.to(device) for t in (hidden, w13, w2, weights, ids, s13, s2, z13, z2)]
    out = torch.full_like(on[0], float("nan"))
    fused_moe(
        *on[:5], backend=backend, out=out, w13_scale=on[5], w2_scale=on[6], w13_zero=on[7],
        w2_zero=on[8],
    )  # fmt: skip
    no_bias = torch.zeros(slots, 2 * inter), torch.zeros(slots, hidden_size)
    ref = reference_biased(hidden, *decoded, weights, ids, *no_bias, SILU)
    err = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def test_int4_checks_zero_points_and_groups():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.zeros(2, 64)
    w13, s13, z13 = random_int4(3, 64, 64, 16, gen, torch.float16)
    w2, s2, z2 = random_int4(3, 64, 32, 16, gen, torch.float16)
    ids, weights = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(ValueError, match="zero points must be uint8"):
        fused_moe(
            hidden, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, w13_zero=z13.int(),
            w2_zero=z2,
        )  # fmt: skip
    with pytest.raises(ValueError, match="come together"):
        fused_moe(hidden, w13, w2, weights, ids, w13_zero=z13, w2_zero=z2)
    with pytest.raises(ValueError, match="4-bit w13"):
        fused_moe(
            hidden, w13[:, :, :16], w2, weights, ids, w13_scale=s13, w2_scale=s2, w13_zero=z13,
            w2_zero=z2,
        )  # fmt: skip
    four_bit = dict(w13_scale=s13, w2_scale=s2, w13_zero=z13, w2_zero=z2)
    bad = [
        ({"w2_zero": None}, "come together"),  # one zero point tensor
        ({"w13_scale": s13[:, :8], "w13_zero": z13[:, :8]}, "4-bit scales must be"),  # rows
        ({"w13_scale": z13, "w13_zero": z13}, "must be floats"),
        ({"w13_scale": s13[:, :, :1].expand(3, 64, 3), "w13_zero": z13[:, :, :1].expand(3, 64, 3)},
         "groups dividing"),
        ({"w13_zero": z13.transpose(1, 2).contiguous().transpose(1, 2)}, "laid out as"),
    ]  # fmt: skip
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            fused_moe(hidden, w13, w2, weights, ids, **{**four_bit, **change})
    mismatched_w2 = torch.zeros(3, 64, 32, dtype=torch.uint8)  # I = 64, w13 says 32
    with pytest.raises(ValueError, match="4-bit w13"):
        fused_moe(hidden, w13, mismatched_w2, weights, ids, **four_bit)


def test_mxfp4_needs_both_scales_and_packed_shapes():
    hidden = torch.zeros(2, 64)
    w13, s13 = quantize_mxfp4(torch.zeros(3, 64, 64))
    w2, s2 = quantize_mxfp4(torch.zeros(3, 64, 32))
    ids, weights = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(ValueError, match="come together"):
        fused_moe(hidden, w13, w2, weights, ids, w13_scale=s13)
    with pytest.raises(ValueError, match="expected scales"):
        fused_moe(hidden, w13[:, :32], w2, weights, ids, w13_scale=s13[:, :32], w2_scale=s2)
    assert fused_moe(hidden, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2).abs().sum() == 0
