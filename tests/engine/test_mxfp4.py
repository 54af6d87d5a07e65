"""gpt-oss's MXFP4 experts: decoded as the format says, kept packed on the host, and served with
the outputs of the same checkpoint with its experts dequantized at rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from engine import LLM, SamplingParams
from kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from tests.conftest import save_tiny_checkpoint
from tests.engine.test_models import assert_prefill_logits_match

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # magnitudes of codes 0..7


def decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The values the spec gives blocks [..., R, G, 16] and scales [..., R, G]: [..., R, 32 G]."""
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).flatten(-2).long()  # [..., R, G, 32]
    values = E2M1[codes & 7] * (1 - 2 * (codes >> 3)).float()
    return (values * torch.exp2(scales.float() - 127)[..., None]).flatten(-2)


def test_dequantize_follows_the_spec() -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (6, 3, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (6, 3), dtype=torch.uint8, generator=gen)
    scales[0, 0], scales[1, 1] = 0, 254  # the extremes: 2**-127 (subnormal) and 2**127
    for dtype in (torch.float32, torch.bfloat16):
        out = dequantize_mxfp4(blocks, scales, dtype)
        assert out.shape == (6, 96) and out.dtype == dtype
        assert torch.equal(out.float(), decode(blocks, scales))
        theirs = convert_moe_packed_tensors(blocks[None], scales[None], dtype=dtype)[0].T
        assert torch.equal(out, theirs)  # transformers' decoder, which ours replaces for speed
    tiny = torch.full_like(scales, 102)  # 2**-25: under float16's range, not so 6 * 2**-25
    assert torch.equal(
        dequantize_mxfp4(blocks, tiny, torch.float16), decode(blocks, tiny).to(torch.float16)
    )


def test_quantize_rounds_to_the_nearest_value_under_the_block_scale() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(5, 64, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 1.0])[:, None]
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (5, 2, 16) and scales.shape == (5, 2)
    back = decode(blocks, scales)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=1)  # [5, 64]
    assert ((back - w).abs() <= step).all()  # within e2m1's widest gap (2) times the scale / 2
    assert torch.equal(back[3], torch.zeros(64))
    assert torch.equal(decode(*quantize_mxfp4(back)), back)  # decoded values are fixed points


def mxfp4_and_reference(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    """`source`'s experts in MXFP4 as OpenAI's release stores them ([E, out, in/32, 16], gate and
    up rows interleaved), and a float copy whose experts are those values dequantized."""
    packed, reference = tmp_path / "mxfp4", tmp_path / "reference"
    weights = load_file(source / "model.safetensors")
    quantized, dequantized = dict(weights), dict(weights)
    for key in [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(weights.pop(key).transpose(1, 2))  # [E, out, in] rows
        del quantized[key]
        quantized[key + "_blocks"], quantized[key + "_scales"] = blocks, scales
        dequantized[key] = decode(blocks, scales).transpose(1, 2).contiguous()
    for folder, tensors in ((packed, quantized), (reference, dequantized)):
        folder.mkdir()
        for f in source.iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
    (packed / "config.json").write_text(json.dumps(config))
    return packed, reference


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    return mxfp4_and_reference(save_tiny_checkpoint("gpt_oss", tmp / "src"), tmp)


def test_mxfp4_experts_serve_as_their_dequantized_values(checkpoints: tuple[Path, Path]) -> None:
    """Same greedy tokens and log-probabilities as the dequantized copy, whose forward in turn
    matches transformers'; the host keeps the packed bytes: under a third of float32's."""
    packed, reference = checkpoints
    assert_prefill_logits_match(reference)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = [[1, 5, 9, 200, 31], [1, *range(40, 60)]]
    llms = [LLM(model=str(p), max_model_len=64) for p in (packed, reference)]
    outs = [llm.generate(prompts, params) for llm in llms]
    for ours, theirs in zip(*outs, strict=True):
        assert ours.token_ids == theirs.token_ids
        ours_lp, theirs_lp = ours.outputs[0].logprobs, theirs.outputs[0].logprobs
        assert ours_lp is not None and theirs_lp is not None
        assert [e.logprob for e in ours_lp] == pytest.approx(
            [e.logprob for e in theirs_lp], abs=1e-5
        )
    stores = [llm.engine.offload.store for llm in llms]
    assert stores[0].mxfp4 and stores[0].parts[0]["w13"].dtype == torch.uint8
    assert stores[0].expert_bytes < stores[1].expert_bytes / 3


def test_mxfp4_checkpoint_matches_transformers_own_mxfp4_loader(
    checkpoints: tuple[Path, Path],
) -> None:
    """transformers reads the packed checkpoint itself (its MXFP4 loader, dequantizing): every
    prompt position's log-probability matches ours, so the layout is the release's as
    transformers knows it, not only as our own reference copy has it."""
    packed, _ = checkpoints
    hf = AutoModelForCausalLM.from_pretrained(
        packed, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    prompt = [1, *range(20, 60)]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0]  # [T, V]
    theirs = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    [out] = LLM(model=str(packed), max_model_len=64).generate([prompt], params)
    assert out.prompt_logprobs is not None
    ours = torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "flags",
    [
        {"expert_cache_size": 1},
        {"expert_cache_ratio": 0.25, "link_gbps": 2.0},
        {"expert_cache_ratio": 1.0, "mxfp4_slots": "packed"},
        {"expert_cache_ratio": 0.25, "mxfp4_slots": "packed", "resident_first": True},
        {"expert_cache_size": 1, "mxfp4_slots": "packed"},
        {
            "expert_cache_ratio": 0.25,
            "mxfp4_slots": "packed",
            "cpu_expert_compute": True,
            "link_gbps": 0.02,
        },
    ],
    ids=[
        "one-slot",
        "ratio-0.25-link",
        "packed-all",
        "packed-0.25-resident-first",
        "packed-one-slot",
        "packed-0.25-host",
    ],
)
def test_offloaded_mxfp4_experts_keep_outputs(
    checkpoints: tuple[Path, Path], flags: dict[str, object]
) -> None:
    """Experts decoded as each copy lands, or kept packed in their slots and decoded by the
    kernel: the outputs of the all-resident, decoded cache."""
    packed, _ = checkpoints
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[1, 5, 9, 200, 31], [1, 300, 12]]
    full = LLM(model=str(packed), max_model_len=64)
    expected = [o.token_ids for o in full.generate(prompts, params)]
    llm = LLM(model=str(packed), max_model_len=64, **flags)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    cache, decoded = llm.engine.offload.cache, full.engine.offload.cache
    if flags.get("mxfp4_slots") == "packed":
        assert cache.slots.w13.dtype == torch.uint8 and "w13_scale" in cache.slots.parts
        per_slot = cache.slots.nbytes / cache.num_slots
        assert per_slot < decoded.slots.nbytes / decoded.num_slots / 3
    else:
        assert cache.slots.w13.dtype == torch.float32  # auto on the CPU: decoded
    if flags.get("expert_cache_ratio") != 1.0:
        assert llm.offload_stats()["misses"] > 0
    if flags.get("cpu_expert_compute"):
        assert llm.offload_stats()["host_computes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_packed_slots_keep_outputs(checkpoints: tuple[Path, Path], dtype: str) -> None:
    """On CUDA the slots stay packed by default and the compiled Triton kernel decodes them:
    the tokens of decoded slots, all resident or a quarter of them."""
    packed, _ = checkpoints
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[1, 5, 9, 200, 31], [1, 300, 12]]
    flags = dict(model=str(packed), max_model_len=64, device="cuda", dtype=dtype)
    decoded = LLM(**flags, mxfp4_slots="decoded").generate(prompts, params)
    for ratio in (1.0, 0.25):
        llm = LLM(**flags, expert_cache_ratio=ratio)
        assert llm.engine.offload.cache.slots.w13.dtype == torch.uint8
        outs = llm.generate(prompts, params)  # the same operands, decoded in the tile
        assert [o.token_ids for o in outs] == [o.token_ids for o in decoded]
