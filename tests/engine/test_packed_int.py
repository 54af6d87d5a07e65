"""GPTQ, AWQ and compressed-tensors checkpoints through the engine: the same model as a float32
checkpoint holding the values the packed integers represent (tests/packed_checkpoints.py packs
them), their 4-bit routed experts kept 4-bit on the host and, opted in, in the slots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, ConfigError, SamplingParams
from engine.checkpoint_packed_int import PackedIntFormat
from engine.model_config import ModelConfig
from engine.quantize import quantize_checkpoint
from tests.conftest import save_tiny_checkpoint
from tests.packed_checkpoints import packed_and_reference

PROMPTS = [[1, 17, 99, 240, 5], [1, *range(40, 75)]]


@pytest.mark.parametrize(
    ("family", "method", "group", "act_order", "bits", "symmetric"),
    [
        ("mixtral", "gptq", 16, False, 4, False),
        ("qwen2_moe", "gptq", 8, True, 4, False),
        ("olmoe", "gptq", 16, False, 8, False),
        ("mixtral", "awq", 16, False, 4, False),
        ("qwen3_moe", "awq", 8, False, 4, False),
        ("qwen3_moe", "compressed-tensors", 16, False, 4, True),
        ("mixtral", "compressed-tensors", 8, False, 4, False),
        ("qwen2_moe", "compressed-tensors", 8, True, 4, True),
        ("deepseek_v3", "compressed-tensors", 16, False, 8, True),
    ],
)
def test_packed_checkpoints_load_as_their_dequantized_values(
    family: str,
    method: str,
    group: int,
    act_order: bool,
    bits: int,
    symmetric: bool,
    tmp_path: Path,
) -> None:
    source = save_tiny_checkpoint(family, tmp_path / "src")
    packed, reference = packed_and_reference(
        source, tmp_path, method, group, act_order, bits, symmetric
    )
    cfg = ModelConfig.from_pretrained(packed).packed_int
    offset = {"gptq": 1, "awq": 0, "compressed-tensors": 1 << (bits - 1)}[method]
    assert cfg == PackedIntFormat(method, bits, group, offset)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    llm = LLM(model=str(packed), max_model_len=64)
    ours = llm.generate(PROMPTS, params)
    theirs = LLM(model=str(reference), max_model_len=64).generate(PROMPTS, params)
    for a, b in zip(ours, theirs, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [e and e.logprob for e in a.prompt_logprobs] == [
            e and e.logprob for e in b.prompt_logprobs
        ]
    # 4-bit experts in consecutive groups stay so on the host; act-order or 8-bit dequantize
    kept = bits == 4 and not act_order
    store = llm.engine.offload.store
    assert store.int4_group == (group if kept else None)
    float32_bytes = (
        4 * store.num_total_experts * sum(math.prod(shape) for shape in store.slot_shapes.values())
    )
    # half a byte a value; a 16-bit scale and a byte of zero point a group
    assert store.total_bytes == (
        float32_bytes // 8 * (1 + 2 * 3 / group) if kept else float32_bytes
    )


def test_autogptq_quantize_config_beside_config_json(tmp_path: Path) -> None:
    """AutoGPTQ's own exports keep the format in quantize_config.json, config.json plain; with
    experts quantized again to MXFP4 at load, they serve as the reference does."""
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    packed, reference = packed_and_reference(source, tmp_path, "gptq", 16)
    config = json.loads((packed / "config.json").read_text())
    quant = config.pop("quantization_config")
    (packed / "config.json").write_text(json.dumps(config))
    (packed / "quantize_config.json").write_text(json.dumps({**quant, "sym": False}))
    assert ModelConfig.from_pretrained(packed).packed_int == PackedIntFormat("gptq", 4, 16, 1)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours, theirs = (
        LLM(model=str(p), max_model_len=64, expert_quantization="mxfp4").generate(PROMPTS, params)
        for p in (packed, reference)
    )
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]


def test_packed_weight_without_its_side_tensors_is_named(tmp_path: Path) -> None:
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    packed, _ = packed_and_reference(source, tmp_path, "gptq", 16)
    tensors = load_file(packed / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.qzeros"]
    save_file(tensors, packed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="o_proj.qweight"):
        LLM(model=str(packed), max_model_len=64)


@pytest.mark.parametrize("slots", ["decoded", "packed"])
@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_4bit_experts_in_slots_change_nothing(method: str, slots: str, tmp_path: Path) -> None:
    """Kept 4-bit on the host, the experts are decoded as each copy lands in its slot, or kept
    packed there and decoded as the kernel reads them: with a cache of a quarter of them,
    outputs equal the all-resident float reference either way."""
    source = save_tiny_checkpoint("qwen3_moe", tmp_path / "src")
    packed, reference = packed_and_reference(source, tmp_path, method, 16)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    offloaded = LLM(model=str(packed), max_model_len=64, expert_cache_ratio=0.25, int4_slots=slots)
    ours = [o.outputs[0].token_ids for o in offloaded.generate(PROMPTS, params)]
    stats = offloaded.offload_stats()
    store = offloaded.engine.offload.store
    assert store.int4_group == 16 and stats["misses"] > 0
    slot_dtype = offloaded.engine.offload.cache.slots.w13.dtype
    assert slot_dtype == (torch.uint8 if slots == "packed" else torch.float32)
    expected = LLM(model=str(reference), max_model_len=64).generate(PROMPTS, params)
    assert ours == [o.outputs[0].token_ids for o in expected]


@pytest.mark.parametrize(
    ("family", "group", "layout", "kept"),
    [
        ("qwen3_moe", 16, "gptq_v2", True),  # zero points stored as they are
        ("mixtral", -1, "gptq", False),  # one group a layer: gate/up and down differ in size
        ("mixtral", 24, "gptq", False),  # a partial last group: dequantized at load
        ("deepseek_v3", 16, "gptq", True),  # latent attention's _proj_with_mqa packed too
        ("qwen3_5_moe", 16, "gptq", True),  # keys as the VL release names them
    ],
)
def test_gptq_layouts_and_group_shapes(
    family: str, group: int, layout: str, kept: bool, tmp_path: Path
) -> None:
    source = save_tiny_checkpoint(family, tmp_path / "src")
    packed, reference = packed_and_reference(source, tmp_path, "gptq", group, layout=layout)
    if family == "qwen3_5_moe":  # side tensors must be renamed as their weights are
        tensors = load_file(packed / "model.safetensors")
        renamed = {k.replace("model.", "model.language_model.", 1): t for k, t in tensors.items()}
        save_file(renamed, packed / "model.safetensors", metadata={"format": "pt"})
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(model=str(packed), max_model_len=64)
    ours = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    theirs = LLM(model=str(reference), max_model_len=64).generate(PROMPTS, params)
    assert ours == [o.outputs[0].token_ids for o in theirs]
    assert (llm.engine.offload.store.int4_group is not None) == kept


def test_zero_biases_autogptq_wrote_are_skipped_nonzero_ones_refused(tmp_path: Path) -> None:
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    packed, reference = packed_and_reference(source, tmp_path, "gptq", 16)
    tensors = load_file(packed / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".qweight")]:
        tensors[key.replace(".qweight", ".bias")] = torch.zeros(tensors[key].shape[1])
    save_file(tensors, packed / "model.safetensors", metadata={"format": "pt"})
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = LLM(model=str(packed), max_model_len=64).generate(PROMPTS, params)
    theirs = LLM(model=str(reference), max_model_len=64).generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]
    tensors["model.layers.0.self_attn.o_proj.bias"] += 0.5
    save_file(tensors, packed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="o_proj.bias.*nonzero"):
        LLM(model=str(packed), max_model_len=64)


def test_quantize_fp8_refuses_packed_checkpoints(tmp_path: Path) -> None:
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    packed, _ = packed_and_reference(source, tmp_path, "gptq", 16)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_checkpoint(packed, tmp_path / "fp8")


def test_int4_at_load_keeps_a_4bit_checkpoints_own_integers(tmp_path: Path) -> None:
    """`--expert-quantization int4` on experts already 4-bit: kept as the checkpoint has them,
    not dequantized and rounded again."""
    source = save_tiny_checkpoint("mixtral", tmp_path / "src")
    packed, reference = packed_and_reference(source, tmp_path, "gptq", 16)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(model=str(packed), max_model_len=64, expert_quantization="int4")
    assert llm.engine.offload.store.int4_group == 16  # the checkpoint's groups, not 32
    ours = llm.generate(PROMPTS, params)
    theirs = LLM(model=str(reference), max_model_len=64).generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in theirs]
