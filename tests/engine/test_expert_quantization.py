"""`--expert-quantization fp8|mxfp4|int4`: routed experts quantized as they load serve exactly as a
float checkpoint holding their quantized values, whichever way the hub stores experts (a tensor
per expert and part, or one per layer and part, with biases), and a layer's wide copy is freed as
soon as it is quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.expert_quantization as expert_quantization
from engine import LLM, ConfigError, SamplingParams
from engine.expert_quantization import ExpertQuantizer
from engine.host_experts import HostExperts
from kernels.fp8 import FP8, dequantize_blocks, quantize_blocks
from kernels.int4 import dequantize_int4, quantize_int4
from kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from tests.conftest import save_tiny_checkpoint
from tests.engine.test_fp8 import fp8_and_reference
from tests.engine.test_mxfp4 import mxfp4_and_reference

BLOCK = (8, 16)  # not square: a transposed layout would round differently
PROMPTS = [[1, 5, 9, 200, 31], [1, *range(40, 70)]]


def fp8_rounded(w: torch.Tensor) -> torch.Tensor:
    """One expert's [R, C] weight as FP8 blocks represent it."""
    return dequantize_blocks(*quantize_blocks(w, BLOCK), BLOCK)


def mxfp4_rounded(w: torch.Tensor) -> torch.Tensor:
    """One expert's [R, C] weight as MXFP4 represents it (32 columns a scale)."""
    return dequantize_mxfp4(*quantize_mxfp4(w), torch.float32)


def int4_rounded(w: torch.Tensor) -> torch.Tensor:
    """One expert's [R, C] weight as 4-bit integers represent it (the tiny models' sizes, 64 and
    32, take groups of 32)."""
    return dequantize_int4(*quantize_int4(w, 32), torch.float32)


ROUNDED = {"fp8": fp8_rounded, "mxfp4": mxfp4_rounded, "int4": int4_rounded}


def rounded_copy(source: Path, out: Path, scheme: str) -> Path:
    """`source` with every routed expert replaced by its quantized values, each expert's w13
    (gate rows, then up rows, [2I, H]) and w2 ([H, I]) quantized whole, in the hub's layout."""
    rounded = ROUNDED[scheme]
    weights = load_file(source / "model.safetensors")
    for key in list(weights):
        if key.endswith(".experts.gate_up_proj") and weights[key].dim() == 3:
            if key + "_bias" in weights:  # gpt-oss: [E, H, 2I], gate and up columns interleaved
                t = weights[key].transpose(1, 2)  # [E, 2I, H] interleaved rows
                w13 = torch.cat((t[:, 0::2], t[:, 1::2]), dim=1)
                back = torch.stack([rounded(w) for w in w13])
                t = torch.empty_like(t)
                half = t.shape[1] // 2
                t[:, 0::2], t[:, 1::2] = back[:, :half], back[:, half:]
                weights[key] = t.transpose(1, 2).contiguous()
            else:  # Llama 4: [E, H, 2I], gate columns then up columns
                w13 = weights[key].transpose(1, 2)
                weights[key] = torch.stack([rounded(w) for w in w13]).transpose(1, 2).contiguous()
        elif key.endswith(".experts.down_proj") and weights[key].dim() == 3:  # [E, I, H]
            w2 = weights[key].transpose(1, 2)
            weights[key] = torch.stack([rounded(w) for w in w2]).transpose(1, 2).contiguous()
        elif key.endswith(".experts.0.w1.weight"):  # Mixtral: per expert w1/w3 (gate/up), w2
            prefix = key.removesuffix("0.w1.weight")
            e = 0
            while f"{prefix}{e}.w1.weight" in weights:
                w1, w3 = weights[f"{prefix}{e}.w1.weight"], weights[f"{prefix}{e}.w3.weight"]
                back = rounded(torch.cat((w1, w3)))
                weights[f"{prefix}{e}.w1.weight"] = back[: w1.shape[0]].contiguous()
                weights[f"{prefix}{e}.w3.weight"] = back[w1.shape[0] :].contiguous()
                weights[f"{prefix}{e}.w2.weight"] = rounded(weights[f"{prefix}{e}.w2.weight"])
                e += 1
    out.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("scheme", ["fp8", "mxfp4", "int4"])
@pytest.mark.parametrize("family", ["mixtral", "llama4", "gpt_oss"])
@pytest.mark.parametrize(
    "offload",
    [{}, {"expert_cache_ratio": 0.25, "predictor": "pregate", "cache_policy": "expertflow"}],
    ids=["resident", "offloaded"],
)
def test_quantized_experts_serve_as_their_quantized_values(
    scheme: str, family: str, offload: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(expert_quantization, "BLOCK", BLOCK)
    source = save_tiny_checkpoint(family, tmp_path / "src")
    reference = rounded_copy(source, tmp_path / "reference", scheme)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    quantized = LLM(model=str(source), max_model_len=64, expert_quantization=scheme, **offload)
    store = quantized.engine.offload.store
    parts = store.parts[store.layers[0]]
    if scheme == "fp8":
        assert parts["w13"].dtype == FP8 and store.fp8_block == BLOCK
        assert parts["w13_scale"].shape[1:] == (-(-parts["w13"].shape[1] // 8), -(-64 // 16))
    elif scheme == "mxfp4":
        assert store.mxfp4 and parts["w13"].shape[2:] == (64 // 32, 16)
    else:
        assert store.int4_group == 32 and parts["w13"].shape[2:] == (64 // 2,)
        assert parts["w13_scale"].dtype == torch.float16 and parts["w13_zero"].shape[2:] == (2,)
    plain = LLM(model=str(source), max_model_len=64).engine.offload.store
    shrink = 3 if scheme == "fp8" else 5  # float32 -> FP8, or MXFP4, and their scales
    assert store.expert_bytes < plain.expert_bytes / shrink
    ours = quantized.generate(PROMPTS, params)
    theirs = LLM(model=str(reference), max_model_len=64, **offload).generate(PROMPTS, params)
    for a, b in zip(ours, theirs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.logprob == y.logprob


def test_a_layer_is_quantized_when_its_last_weight_lands_and_its_wide_copy_freed() -> None:
    wide = {"w13": torch.randn(2, 8, 16), "w2": torch.randn(2, 16, 4)}
    original = wide["w2"][1].clone()
    views = [wide["w13"][0, :4], wide["w13"][0, 4:], wide["w2"][1]]  # what a loader keeps
    experts = HostExperts(layers={3: dict(wide)}, compute_dtype=torch.float32)
    quantizer = ExpertQuantizer(experts, {"a": 3, "b": 3}, block=(4, 8))
    quantizer.landed("a")
    quantizer.landed("unrelated")
    assert experts.layers[3]["w13"].dtype == torch.float32  # "b" is still to come
    quantizer.landed("b")
    parts = experts.layers[3]
    assert parts["w13"].dtype == FP8 and parts["w13_scale"].shape == (2, 2, 2)
    assert parts["w2_scale"].shape == (2, 4, 1) and experts.fp8_block == (4, 8)
    assert all(v.untyped_storage().nbytes() == 0 for v in views)
    back = dequantize_blocks(parts["w2"][1], parts["w2_scale"][1], (4, 8))
    torch.testing.assert_close(back, original, atol=0.07 * original.abs().max().item(), rtol=0)


def test_contradictions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="contradicts"):
        LLM(model=str(tmp_path), expert_quantization="fp8", fp8_experts=False)
    packed, _ = mxfp4_and_reference(save_tiny_checkpoint("gpt_oss", tmp_path / "src"), tmp_path)
    with pytest.raises(ConfigError, match="MXFP4"):
        LLM(model=str(packed), max_model_len=64, expert_quantization="fp8")
    narrow = save_tiny_checkpoint("glm4_moe", tmp_path / "glm")  # experts 16 wide
    for scheme in ("mxfp4", "int4"):
        with pytest.raises(ConfigError, match="in 32s"):
            LLM(model=str(narrow), max_model_len=64, expert_quantization=scheme)


def test_an_expert_weight_given_twice_is_refused_not_written_into_freed_memory(
    tmp_path: Path,
) -> None:
    """An unindexed folder's extra shard repeats an expert weight that lands after its layer
    was quantized (and its wide copy freed)."""
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    save_file({key: load_file(source / "model.safetensors")[key]}, source / "zz.safetensors")
    with pytest.raises(ConfigError, match="appears twice"):
        LLM(model=str(source), max_model_len=64, expert_quantization="fp8")


@pytest.mark.parametrize("scheme", ["mxfp4", "int4"])
def test_an_fp8_checkpoints_experts_go_to_4_bits(scheme: str, tmp_path: Path) -> None:
    fp8, _ = fp8_and_reference(save_tiny_checkpoint("qwen3_moe", tmp_path / "src"), tmp_path)
    store = LLM(model=str(fp8), max_model_len=64, expert_quantization=scheme).engine.offload.store
    assert (store.mxfp4, store.int4_group is not None) == (scheme == "mxfp4", scheme == "int4")
    assert store.fp8_block is None


def test_int4_rounds_each_value_to_its_groups_nearest_step() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 6, 64, generator=gen) * torch.tensor([0.01, 3.0])[:, None, None]
    w[0, 0] = w[0, 0].abs()  # a group with no negative value: its range still holds 0
    packed, scales, zeros = quantize_int4(w, 32)
    assert packed.shape == (2, 6, 32) and scales.shape == zeros.shape == (2, 6, 2)
    back = dequantize_int4(packed, scales, zeros, torch.float32)
    step = scales.float().repeat_interleave(32, dim=-1)  # [2, 6, 64]
    assert ((back - w).abs() <= 0.51 * step).all()
    assert (back - w).abs().max() > 0.3 * step.min()  # it did round
    on_grid = dequantize_int4(packed, scales, zeros, torch.float32)
    assert torch.equal(dequantize_int4(*quantize_int4(on_grid, 32), torch.float32), on_grid)
