"""Qwen3-Next / Qwen3.5 config.json variants and the delta rule's dispatch: the cases a review of
the hybrid families found (tied embeddings of the VL release, attention biases, legacy rotary
scaling, no linear layer at all) and FP8 experts stacked per layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import engine.models.gated_delta as gated_delta
from engine import LLM, ConfigError, SamplingParams
from engine.checkpoint_fp8 import dequantize_fp8
from engine.config import EngineConfig
from engine.kv_cache import num_kv_blocks
from engine.model_config import ModelConfig
from tests.conftest import build_tokenizer, save_tiny_checkpoint, tiny_config
from tests.engine.test_models import assert_prefill_logits_match


def release_config(text: dict, **top: object) -> dict:
    """Qwen3.5's config.json as released: the VL wrapper, the text model under text_config."""
    return {"model_type": "qwen3_5_moe", "text_config": text, **top}


def test_vl_release_ties_embeddings_as_its_top_level_says() -> None:
    text = {**tiny_config("qwen3_5_moe").to_dict(), "tie_word_embeddings": False}
    assert ModelConfig.from_dict(release_config(text, tie_word_embeddings=True)).tie_word_embeddings
    assert not ModelConfig.from_dict(release_config(text)).tie_word_embeddings


def test_legacy_yarn_rope_scaling_of_the_text_model_is_read() -> None:
    """Older config.json style: `rope_scaling` beside top-level rope_theta and rotary factor."""
    text = tiny_config("qwen3_5_moe").to_dict()  # model_type qwen3_5_moe_text
    del text["rope_parameters"]
    text |= {
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
    }
    for raw in (text, release_config(text)):
        cfg = ModelConfig.from_dict(raw)
        assert len(cfg.rope_inv_freq) == cfg.rotary_dim // 2  # YaRN's frequencies
        assert cfg.rope_attention_factor > 1.0


def test_all_full_attention_layers_need_no_linear_state() -> None:
    raw = {**tiny_config("qwen3_next").to_dict(), "layer_types": ["full_attention"] * 4}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.linear_attention is None and cfg.attention_layers == (0, 1, 2, 3)


def test_attention_biases_load_and_match_transformers(tmp_path: Path) -> None:
    """transformers biases q, k, v and o with `attention_bias`."""
    config = tiny_config("qwen3_next")
    config.attention_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, param in model.named_parameters():
        if name.endswith(("proj.bias", "norm.weight")):
            param.data.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert_prefill_logits_match(tmp_path)


def test_fp8_experts_stacked_per_layer_are_refused_by_name() -> None:
    weight = torch.zeros(4, 8, 8).to(torch.float8_e4m3fn)
    scales = {"w.weight_scale_inv": torch.ones(4, 1, 1)}
    with pytest.raises(ConfigError, match=r"'w\.weight'.*3-D"):
        dequantize_fp8("w.weight", weight, scales, (8, 8))


def test_cpu_runs_the_torch_delta_rule_even_where_fla_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLA's kernels take half-precision CUDA tensors only; transformers' wrapper would call them
    for any tensor once FLA imports. On the CPU the engine calls the torch reference itself."""

    def fla(*args: object, **kwargs: object) -> None:
        raise AssertionError("the FLA-dispatching wrapper was called on the CPU")

    monkeypatch.setattr(gated_delta, "torch_chunk_gated_delta_rule", fla)
    monkeypatch.setattr(gated_delta, "torch_recurrent_gated_delta_rule", fla)
    llm = LLM(model=str(save_tiny_checkpoint("qwen3_next", tmp_path)), max_model_len=64)
    out = llm.generate([[1, 5, 9, 13]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].token_ids) == 3


def test_kv_budget_counts_only_the_layers_that_attend() -> None:
    """Three linear layers in four: the same bytes hold four times the tokens."""
    raw = tiny_config("qwen3_next").to_dict()
    hybrid = ModelConfig.from_dict(raw)
    dense = ModelConfig.from_dict({**raw, "layer_types": ["full_attention"] * 4})
    cfg = EngineConfig(max_num_seqs=10**6, max_model_len=64)  # wants more than the budget
    assert num_kv_blocks(hybrid, cfg, 64) == 4 * num_kv_blocks(dense, cfg, 64)
