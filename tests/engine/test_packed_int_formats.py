"""The packed-integer formats word by word: how GPTQ, AWQ and compressed-tensors lay values out,
words that hold padding, the configs we refuse, and when 4-bit slots stay packed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import ConfigError, EngineConfig
from engine.checkpoint_packed_int import PackedIntFormat, dequantize_packed, unpack
from engine.model_config import ModelConfig
from tests.packed_checkpoints import words

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
