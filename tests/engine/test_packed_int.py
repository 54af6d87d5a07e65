"""GPTQ and AWQ checkpoints load dequantized: the same model as a float32 checkpoint holding the
values the packed integers represent. The checkpoints here are packed by this file, word by word,
from the formats' definitions (AutoGPTQ's and AutoAWQ's packers), not by the loader's code."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, ConfigError, EngineConfig, SamplingParams
from engine.checkpoint_packed_int import PackedIntFormat, dequantize_packed, unpack
from engine.model_config import ModelConfig
from engine.quantize import quantize_checkpoint
from tests.conftest import save_tiny_checkpoint

PROMPTS = [[1, 17, 99, 240, 5], [1, *range(40, 75)]]
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's packer: word value j <- column order[j]
CT = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 32}}
    },
}


def ct(**weights: object) -> dict:
    """CT with its one config group's weight scheme changed."""
    group = CT["config_groups"]["g"]
    return {**CT, "config_groups": {"g": {**group, "weights": {**group["weights"], **weights}}}}


def words(values: torch.Tensor, bits: int, along: int, order: tuple[int, ...] = ()) -> torch.Tensor:
    """Pack int values [n, m] 32 // bits to an int32 along dim `along`, value j of each word in
    bits j*bits.., taking element order[j] of each run of 32 // bits (default: element j)."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    values = values.long() if along == 0 else values.long().T
    packed = torch.zeros(values.shape[0] // per_word, values.shape[1], dtype=torch.long)
    for j in range(per_word):
        packed |= values[order[j] :: per_word] << (bits * j)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return packed if along == 0 else packed.T.contiguous()


def quantize(
    weight: torch.Tensor,
    bits: int,
    group_of: torch.Tensor,
    groups: int,
    min_zero: int,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] -> q [in, out], zeros [groups, out], float16 scales [groups, out], and
    the float32 values they represent [out, in]; input channel i is in group group_of[i].
    `symmetric`: every zero point is 2^(bits-1), the middle of the range."""
    top = (1 << bits) - 1
    w = weight.T.float()  # [in, out]
    lo = torch.stack([w[group_of == g].amin(0) for g in range(groups)]).clamp(max=0)
    hi = torch.stack([w[group_of == g].amax(0) for g in range(groups)]).clamp(min=0)
    if symmetric:
        lo, hi = -torch.maximum(-lo, hi), torch.maximum(-lo, hi)
    scales = ((hi - lo) / top).clamp_min(1e-6).half()  # [groups, out]
    zeros = torch.round(-lo / scales.float()).clamp(min_zero, top).long()
    if symmetric:
        zeros = torch.full_like(zeros, 1 << (bits - 1))
    q = (torch.round(w / scales.float()[group_of]) + zeros[group_of]).clamp(0, top).long()
    values = ((q - zeros[group_of]).float() * scales.float()[group_of]).T
    return q, zeros, scales, values


LINEAR = ("_proj.weight", "_mqa.weight", ".w1.weight", ".w2.weight", ".w3.weight", "lm_head.weight")


def quantized_names(tensors: dict[str, torch.Tensor], group: int) -> list[str]:
    """Every projection and expert weight (not the routers, norms or embeddings), and the LM
    head, as GPTQ and AWQ quantize them; with `group` > 0, those of whole groups only."""
    return [
        k
        for k, t in tensors.items()
        if k.endswith(LINEAR)
        and t.dim() == 2
        and t.shape[0] % 8 == 0
        and (group < 1 or t.shape[1] % group == 0)
    ]


def packed_and_reference(
    source: Path,
    tmp_path: Path,
    method: str,
    group: int,
    act_order: bool = False,
    bits: int = 4,
    symmetric: bool = False,
    layout: str = "gptq",
) -> tuple[Path, Path]:
    """A GPTQ (`layout`: "gptq" stores zero points minus one, "gptq_v2" does not), AWQ (GEMM,
    4-bit) or compressed-tensors (pack-quantized) copy of `source`, and a float32 copy of the
    values it holds. GPTQ's `group` may be -1 (one group a layer) or leave a partial last group."""
    packed_dir, reference = tmp_path / method, tmp_path / "reference"
    shutil.copytree(source, packed_dir)
    shutil.copytree(source, reference)
    tensors = load_file(source / "model.safetensors")
    out, values = {}, dict(tensors)
    generator = torch.Generator().manual_seed(0)
    for name in quantized_names(tensors, group if method != "gptq" else 0):
        channels = tensors[name].shape[1]
        size = channels if group == -1 else group
        group_of = torch.arange(channels) // size
        if act_order:  # channels quantized in a permuted order: groups are not contiguous
            group_of = group_of[torch.randperm(channels, generator=generator)]
        q, zeros, scales, values[name] = quantize(
            tensors[name], bits, group_of, -(-channels // size), int(method == "gptq"), symmetric
        )
        prefix = name.removesuffix(".weight")
        if method == "gptq":
            out[prefix + ".qweight"] = words(q, bits, along=0)
            out[prefix + ".qzeros"] = words(zeros - int(layout == "gptq"), bits, along=1)
            out[prefix + ".g_idx"] = group_of.to(torch.int32)
            out[prefix + ".scales"] = scales
        elif method == "awq":
            out[prefix + ".qweight"] = words(q, 4, along=1, order=AWQ_PACK_ORDER)
            out[prefix + ".qzeros"] = words(zeros, 4, along=1, order=AWQ_PACK_ORDER)
            out[prefix + ".scales"] = scales
        else:  # [out, ...]: values and zero points stored as the signed q - 2^(bits-1), plus it
            out[prefix + ".weight_packed"] = words(q.T, bits, along=1)
            scales = scales.to(torch.bfloat16)  # as llm-compressor writes them
            values[name] = ((q - zeros[group_of]).float() * scales.float()[group_of]).T
            out[prefix + ".weight_scale"] = scales.T.contiguous()
            out[prefix + ".weight_shape"] = torch.tensor(tensors[name].shape)
            if not symmetric:
                out[prefix + ".weight_zero_point"] = words(zeros.T, bits, along=0)
            if act_order:
                out[prefix + ".weight_g_idx"] = group_of.to(torch.int32)
        del tensors[name]
    assert len(out) > 10
    save_file({**tensors, **out}, packed_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(values, reference / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    scheme = {"type": "int", "num_bits": bits, "strategy": "group", "group_size": group}
    config["quantization_config"] = {
        "gptq": {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": act_order,
            "checkpoint_format": layout,
        },
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm"},
        "compressed-tensors": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**scheme, "symmetric": symmetric},
                    "input_activations": None,
                }
            },
            "ignore": [],
        },
    }[method]
    (packed_dir / "config.json").write_text(json.dumps(config))
    return packed_dir, reference


def test_words_unpack_as_the_formats_lay_them_out() -> None:
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack(word, 4, dim=0).flatten().tolist() == list(range(8))  # GPTQ: down the rows
    assert unpack(word, 4, dim=1).flatten().tolist() == list(range(8))
    assert unpack(torch.tensor([[-1]], dtype=torch.int32), 4, dim=0).flatten().tolist() == [15] * 8
    assert unpack(torch.tensor([[0x04030201]], dtype=torch.int32), 8, dim=1).tolist() == [
        [1, 2, 3, 4]
    ]
    # AWQ: value j of the word is column AWQ_PACK_ORDER[j]; one group, zero 0, scale 1
    fmt = PackedIntFormat("awq", 4, 1, 0)
    side = {
        "m.qzeros": torch.zeros(1, 1, dtype=torch.int32),
        "m.scales": torch.ones(1, 8, dtype=torch.float16),
    }
    columns = dequantize_packed("m", word, side, fmt)  # [out 8, in 1]
    assert columns.flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # GPTQ: stored zero 7 means 8; two input groups with their own scales
    fmt = PackedIntFormat("gptq", 4, 4, 1)
    side = {
        "m.qzeros": torch.tensor([[0x77777777], [0x77777777]], dtype=torch.int32),
        "m.scales": torch.tensor([[0.5] * 8, [2.0] * 8], dtype=torch.float16),
    }
    weight = dequantize_packed("m", torch.full((1, 8), 0x76543210, dtype=torch.int32), side, fmt)
    assert weight[0].tolist() == [-4.0, -3.5, -3.0, -2.5, -8.0, -6.0, -4.0, -2.0]


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


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size=0"),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True},
            "Marlin",
        ),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*gate": {}}},
            "dynamic",
        ),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
            "checkpoint_format='marlin'",
        ),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "gemv"),
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits=8"),
        ({"quant_method": "awq", "bits": 4, "group_size": -1}, "group_size=-1"),
        ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False}, "zero_point"),
        ({**CT, "format": "float-quantized"}, "only pack-quantized"),
        (ct(type="float", num_bits=8), "type='float'"),
        (ct(num_bits=3), "num_bits=3"),
        (ct(strategy="tensor"), "strategy='tensor'"),
        (ct(group_size=None), "group_size=None"),
        (
            {
                **CT,
                "config_groups": {
                    "a": CT["config_groups"]["g"],
                    "b": ct(num_bits=8)["config_groups"]["g"],
                },
            },
            "one integer weight scheme",
        ),
        (
            {**CT, "config_groups": {"g": {**CT["config_groups"]["g"], "input_activations": {}}}},
            "unquantized activations",
        ),
    ],
)
def test_unsupported_packed_formats_name_the_field(quant: dict, message: str) -> None:
    raw = json.loads((Path(__file__).parents[2] / "models/expertflow-demo/config.json").read_text())
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**raw, "quantization_config": quant})


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
    slot_dtype = offloaded.engine.offload.cache.w13.dtype
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


@pytest.mark.parametrize("group", [0, 10], ids=["channel", "group-10"])
def test_compressed_tensors_rows_and_columns_that_fill_no_whole_word(group: int) -> None:
    """13 output rows and 70 input columns: the last word of each row, and of the zero points'
    columns, is partly padding, cut by `weight_shape` and by the row count."""
    out, channels = 13, 70
    groups = channels // group if group else 1
    gen = torch.Generator().manual_seed(group)
    q = torch.randint(-8, 8, (out, channels), generator=gen)  # signed, as stored minus 8
    zero = torch.randint(-8, 8, (out, groups), generator=gen)
    scale = (torch.rand(out, groups, generator=gen) + 0.1).to(torch.bfloat16)

    def padded(values: torch.Tensor, along: int) -> torch.Tensor:
        """Pack values plus 8 along `along`, padded with zeros to whole words."""
        pad = list(values.shape)
        pad[along] = -values.shape[along] % 8
        return words(torch.cat((values, values.new_zeros(pad)), along) + 8, 4, along=along)

    side = {
        "m.weight_scale": scale,
        "m.weight_zero_point": padded(zero, 0),  # [2, groups]
        "m.weight_shape": torch.tensor([out, channels]),
    }
    fmt = PackedIntFormat("compressed-tensors", 4, group, 8)
    group_of = torch.arange(channels) // (group or channels)
    expected = (q - zero[:, group_of]).float() * scale.float()[:, group_of]
    assert torch.equal(dequantize_packed("m", padded(q, 1), side, fmt), expected)
    unpacked_zero = {**side, "m.weight_zero_point": (zero + 8).to(torch.int8)}
    with pytest.raises(ConfigError, match="int32 words"):
        dequantize_packed("m", padded(q, 1), unpacked_zero, fmt)
    with pytest.raises(ConfigError, match="13 rows"):
        dequantize_packed("m", padded(q, 1), {**side, "m.weight_zero_point": words(
            torch.zeros(24, groups, dtype=torch.long), 4, along=0)}, fmt)  # fmt: skip


def test_packed_4bit_slots_are_opt_in() -> None:
    """Packed 4-bit slots wait for their compiled kernel to be timed on a GPU; MXFP4's default
    is unchanged (decoded on the CPU)."""
    assert not EngineConfig().packed_slots(int4=True)
    assert EngineConfig(int4_slots="packed").packed_slots(int4=True)
    assert not EngineConfig(int4_slots="packed").packed_slots(int4=False)
    assert EngineConfig(mxfp4_slots="packed").packed_slots(int4=False)
