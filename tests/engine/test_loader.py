"""Unsupported or malformed checkpoints fail at load with an error naming the field or weight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, ConfigError, SamplingParams
from engine.model_config import ModelConfig
from tests.conftest import save_tiny_checkpoint, tiny_config


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path: Path, edit) -> None:  # noqa: ANN001
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "llama"}, "model_type='llama' is not supported"),
        ({"num_local_experts": None}, "num_local_experts"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok=99"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "rope_scaling type 'dyn"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling of type 'yarn' is malformed"),
    ],
)
def test_bad_config_names_the_field(
    mixtral_checkpoint: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    path = copy_checkpoint(mixtral_checkpoint, tmp_path / "ckpt")
    edit_config(path, **changes)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        LLM(model=str(path))


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        ("deepseek_v3", {"scoring_func": "softmax", "topk_method": "noaux_tc"}, "scoring_func"),
        ("deepseek_v3", {"n_group": 3}, "n_group=3"),
        ("deepseek_v3", {"kv_lora_rank": None}, "kv_lora_rank"),
        ("deepseek_v3", {"num_experts_per_tok": 5}, "exceeds the experts of topk_group=2"),
        (
            "glm4_moe",
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 1.5}},
            "partial_rotary_factor=1.5",
        ),
        ("glm4_moe", {"n_group": 3}, "n_group=3"),
        ("glm4_moe", {"n_routed_experts": None}, "n_routed_experts"),
        ("glm4_moe", {"first_k_dense_replace": 3}, "no MoE layer among 3"),
        ("gpt_oss", {"layer_types": ["sliding_attention"]}, "layer_types must name"),
        ("gpt_oss", {"layer_types": ["local"] * 3}, "layer_types must name"),
        ("gpt_oss", {"sliding_window": None}, "positive sliding_window"),
        ("gpt_oss", {"swiglu_limit": 0}, "swiglu_limit=0"),
        (
            "gpt_oss",
            {"quantization_config": {"quant_method": "mxfp4"}, "hidden_size": 48},
            "hidden_size a multiple of 32",
        ),
        (
            "mixtral",
            {"quantization_config": {"quant_method": "mxfp4"}},
            "'mxfp4' is supported for gpt_oss only",
        ),
        (
            "mixtral",
            {"quantization_config": {"quant_method": "bitsandbytes"}},
            "'bitsandbytes' is not supported",
        ),
        ("minimax_m2", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ("glm4_moe_lite", {"mlp_layer_types": ["dense", "moe", "sparse"]}, "mlp_layer_types"),
        ("minimax_m2", {"qk_norm_type": "per_group"}, "qk_norm_type='per_group'"),
        ("minimax_m2", {"rope_parameters": {"rope_theta": 1e4}, "rotary_dim": 32}, "must be in"),
    ],
)
def test_bad_grouped_routing_config_names_the_field(
    family: str, changes: dict, message: str
) -> None:
    raw = {**tiny_config(family).to_dict(), **changes}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "minimax_m2"])
def test_multi_token_prediction_layers_are_skipped(family: str, tmp_path: Path) -> None:
    path = save_tiny_checkpoint(family, tmp_path / "ckpt")
    num_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    edit_weights(
        path, lambda w: w.update({f"model.layers.{num_layers}.eh_proj.weight": torch.ones(2)})
    )
    LLM(model=str(path), max_model_len=32)


def test_missing_weight_is_named(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(mixtral_checkpoint, tmp_path / "ckpt")
    edit_weights(path, lambda w: w.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ConfigError, match=r"experts\.3\.w2"):
        LLM(model=str(path))


def test_wrong_shape_is_named(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(mixtral_checkpoint, tmp_path / "ckpt")
    edit_weights(path, lambda w: w.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ConfigError, match=r"model\.norm\.weight.*\(7,\)"):
        LLM(model=str(path))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        LLM(model=str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"model_type": "mixtral",', "malformed .JSONDecodeError"),
        ("[1, 2]", "malformed .AttributeError"),
        ('{"hidden_size": "abc"}', "malformed .ValueError: invalid literal"),
        ('{"hidden_size": [64]}', "malformed .TypeError"),
        ('{"num_attention_heads": 0}', "malformed .ZeroDivisionError"),
        ('{"eos_token_id": "x"}', "malformed .ValueError"),
        ('{"max_position_embeddings": -1}', "max_position_embeddings=-1 must be >= 1"),
        ('{"model_type": "llama"}', "model_type='llama' is not supported"),  # named no folder
        ('{"num_experts_per_tok": 99}', "num_experts_per_tok=99 exceeds the number of experts"),
    ],
)
def test_hand_edited_config_json_is_named(
    mixtral_checkpoint: Path, tmp_path: Path, text: str, message: str
) -> None:
    """Not JSON, wrong types, a size below 1, a family or field we do not serve: a ConfigError
    naming the file by its path (one line of error from the commands), where these raised
    JSONDecodeError, ValueError or a torch error, or (the family) named only "config.json"."""
    path = copy_checkpoint(mixtral_checkpoint, tmp_path / "ckpt")
    if text.startswith("{") and text.endswith("}"):
        edit_config(path, **json.loads(text))
    else:
        (path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"{path / 'config.json'}: {message}"):
        ModelConfig.from_pretrained(path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("model.safetensors", "hello", "model.safetensors: not a readable safetensors file"),
        ("model.safetensors.index.json", '{"map": {}}', "index.json: malformed .KeyError"),
        ("model.safetensors.index.json", "{", "index.json: malformed .JSONDecodeError"),
    ],
)
def test_corrupt_shard_or_index_is_named(
    mixtral_checkpoint: Path, tmp_path: Path, name: str, text: str, message: str
) -> None:
    """safetensors' 'Error while deserializing header' named no file, and a malformed index
    raised KeyError with a traceback."""
    path = copy_checkpoint(mixtral_checkpoint, tmp_path / "ckpt")
    (path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        LLM(model=str(path))


def test_missing_or_misshapen_attention_part_is_named(
    mixtral_checkpoint: Path, tmp_path: Path
) -> None:
    """q/k/v_proj fill rows of one fused qkv_proj; errors still name the hub's own key."""
    missing = copy_checkpoint(mixtral_checkpoint, tmp_path / "missing")
    edit_weights(missing, lambda w: w.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.k_proj\.weight"):
        LLM(model=str(missing))
    misshapen = copy_checkpoint(mixtral_checkpoint, tmp_path / "misshapen")
    edit_weights(
        misshapen, lambda w: w.update({"model.layers.1.self_attn.v_proj.weight": torch.ones(3, 64)})
    )
    with pytest.raises(ConfigError, match=r"layers\.1\.self_attn\.v_proj\.weight.*\(3, 64\)"):
        LLM(model=str(misshapen))


def test_generation_config_eos_ids_stop_generation(
    mixtral_checkpoint: Path, tmp_path: Path
) -> None:
    """generation_config.json may name more EOS ids than config.json (gpt-oss's `<|call|>`):
    generation stops on them too; a checkpoint without one is read as before."""
    path = copy_checkpoint(mixtral_checkpoint, tmp_path / "ckpt")
    (path / "generation_config.json").unlink(missing_ok=True)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    [free] = LLM(model=str(path), max_model_len=64).generate([[1, 5, 9]], params)
    first = free.outputs[0].token_ids[0]
    assert len(free.outputs[0].token_ids) > 1  # not an EOS of config.json's
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first]}))
    [stopped] = LLM(model=str(path), max_model_len=64).generate([[1, 5, 9]], params)
    assert stopped.outputs[0].token_ids == [first]
    assert stopped.outputs[0].finish_reason == "stop"
    for bad in ('{"eos_token_id": "</s>"}', "{not json"):
        (path / "generation_config.json").write_text(bad)
        with pytest.raises(ConfigError, match="generation_config.json"):
            LLM(model=str(path), max_model_len=64)
