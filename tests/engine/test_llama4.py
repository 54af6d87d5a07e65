"""Llama 4 beyond the family-parametrized tests: Meta's vision-language release layout, chunked
attention across KV blocks and prefill chunks, top-2 routing on the expert inputs, Maverick's
variant (no q/k norm), and config.json as the hub writes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine import LLM, ConfigError, SamplingParams
from engine.family_config import LocalAttention, RouterConfig
from engine.model_config import ModelConfig
from engine.models.router import Router
from tests.conftest import build_tokenizer, save_tiny_checkpoint, tiny_config
from tests.engine.test_models import assert_prefill_logits_match

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
LONG_PROMPT = [1, *range(40, 70)]  # 31 tokens: four chunks of 8


def reference_greedy(model: torch.nn.Module, prompt: list[int], tokens: int = 20) -> list[int]:
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def save_variant(path: Path, **changes: object) -> Path:
    config = tiny_config("llama4")
    for key, value in changes.items():
        setattr(config, key, value)
    config.__post_init__()  # re-derive moe_layers, no_rope_layers and layer_types
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def test_vl_release_loads_its_language_model(tmp_path: Path) -> None:
    """transformers' Llama4ForConditionalGeneration as saved: the text model under
    `language_model.`, the config under text_config, a vision tower and projector beside it."""
    vision = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=28,
        patch_size=14,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=64,
    )
    torch.manual_seed(0)
    config = Llama4Config(text_config=tiny_config("llama4").to_dict(), vision_config=vision)
    model = Llama4ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), max_model_len=64)
    assert llm.engine.model_config.family == "llama4"
    [out] = llm.generate([LONG_PROMPT], GREEDY)
    with torch.no_grad():  # the text model's own generate (the VL one wants images in 5.24)
        assert out.token_ids == reference_greedy(model.language_model, LONG_PROMPT)


def test_chunks_cross_kv_blocks_and_prefill_chunks(tmp_path: Path) -> None:
    """Blocks of 2 tokens (a chunk's keys start mid-table) and 5-token prefill chunks (a step's
    queries straddle a chunk boundary) while another sequence decodes beside."""
    path = save_tiny_checkpoint("llama4", tmp_path)
    llm = LLM(model=str(path), max_model_len=64, block_size=2, max_num_batched_tokens=5)
    prompts = [LONG_PROMPT, [1, 300, 12]]
    outs = llm.generate(prompts, GREEDY)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference_greedy(hf, prompt)


@pytest.mark.parametrize(
    "changes",
    [
        {"num_experts_per_tok": 2},  # each expert's input weighted by its own sigmoid score
        {"use_qk_norm": False, "interleave_moe_layer_step": 1},  # Maverick's attention
        {"attn_temperature_tuning": False, "attention_chunk_size": 64},  # causal, unscaled
    ],
    ids=["top2", "no-qk-norm", "no-temperature-one-chunk"],
)
def test_variants_match_transformers(changes: dict[str, object], tmp_path: Path) -> None:
    path = save_variant(tmp_path, **changes)
    assert_prefill_logits_match(path)
    [out] = LLM(model=str(path), max_model_len=64).generate([LONG_PROMPT], GREEDY)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert out.token_ids == reference_greedy(hf, LONG_PROMPT)


def scout_config() -> dict:
    """Llama-4-Scout-17B-16E's config.json as released (the vision config left out)."""
    text = {
        "model_type": "llama4_text",
        "attention_chunk_size": 8192,
        "head_dim": 128,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "interleave_moe_layer_step": 1,
        "max_position_embeddings": 10485760,
        "no_rope_layers": [],
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 16.0,
            "high_freq_factor": 1.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "use_qk_norm": True,
        "vocab_size": 202048,
        "eos_token_id": [200001, 200007, 200008],
    }
    return {"model_type": "llama4", "text_config": text, "tie_word_embeddings": False}


def test_scout_config_reads_as_transformers_builds_it() -> None:
    cfg = ModelConfig.from_dict(scout_config())
    assert cfg.nope_layers == tuple(range(3, 48, 4))
    assert cfg.local_layers == tuple(i for i in range(48) if i % 4 != 3)
    assert cfg.local_attention == LocalAttention(8192, chunked=True)
    assert cfg.nope_temperature == (8192.0, 0.1)
    assert cfg.qk_norm == "l2" and cfg.rope_interleaved and cfg.router_weights_on_input
    assert cfg.dense_layers == () and cfg.shared_expert_intermediate_size == 8192
    assert cfg.router.scoring == "sigmoid" and not cfg.router.normalize and cfg.top_k == 1
    assert len(cfg.rope_inv_freq) == 64 and all(math.isfinite(f) for f in cfg.rope_inv_freq)
    assert cfg.eos_token_ids == (200001, 200007, 200008)


def test_a_chunk_size_left_out_is_transformers_default() -> None:
    raw = scout_config()
    del raw["text_config"]["attention_chunk_size"]
    assert ModelConfig.from_dict(raw).local_attention == LocalAttention(8192, chunked=True)


def test_release_written_by_transformers_4_51_loads() -> None:
    """Llama-4-Scout-17B-16E's text_config as released (transformers 4.51.0 wrote it; source: a
    stored Llama4Config dump of the checkpoint): `attn_temperature_tuning` is the int 4, which
    4.51 read by truthiness and transformers 5's strict config class refuses. Its Llama 3 rotary
    goes through that class, so the release must still load, with the tuning on."""
    text = {
        "model_type": "llama4_text",
        "attention_bias": False,
        "attention_chunk_size": 8192,
        "attn_scale": 0.1,
        "attn_temperature_tuning": 4,
        "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192,
        "for_llm_compressor": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "interleave_moe_layer_step": 1,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "max_position_embeddings": 262144,
        "moe_layers": list(range(48)),
        "no_rope_layers": [1, 1, 1, 0] * 12,
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "pad_token_id": 200018,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        "use_qk_norm": True,
        "vocab_size": 202048,
    }
    raw = {"model_type": "llama4", "text_config": text, "tie_word_embeddings": False}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.nope_temperature == (8192.0, 0.1) and cfg.nope_layers == tuple(range(3, 48, 4))
    theirs = Llama4TextConfig.from_dict({**text, "attn_temperature_tuning": True})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](theirs, "cpu")
    assert cfg.rope_inv_freq == tuple(inv_freq.tolist())


def test_router_picks_by_logit_where_sigmoids_round_to_one() -> None:
    """sigmoid(18) and sigmoid(17) are both 1.0 in float32: the top logit still wins, as in
    transformers (which takes the top-k of the logits)."""
    router = Router(RouterConfig(top_k=1, normalize=False, scoring="sigmoid"), 2, 4)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[18.0, 0.0], [17.0, 0.0], [0.0, 0.0], [-3.0, 0.0]]))
    _, weights, ids = router(torch.tensor([[1.0, 0.0]]))
    assert ids.tolist() == [[0]] and weights.tolist() == [[1.0]]


def test_maverick_layout_interleaves_dense_layers() -> None:
    raw = scout_config()
    raw["text_config"] |= {"interleave_moe_layer_step": 2, "num_local_experts": 128}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.moe_layers == tuple(range(1, 48, 2)) and cfg.dense_intermediate_size == 16384


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_types": ["sliding_attention"] * 48}, "layer_types"),
        ({"moe_layers": [0, 48]}, "moe_layers"),
        ({"no_rope_layers": [1, 0]}, "no_rope_layers"),
        ({"moe_layers": []}, "no MoE layer"),
        ({"attention_chunk_size": None}, "attention_chunk_size"),
    ],
)
def test_malformed_layouts_are_refused_by_name(changes: dict, message: str) -> None:
    raw = scout_config()
    raw["text_config"] |= changes
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_cache_aware_routing_is_refused(tmp_path: Path) -> None:
    """Llama 4's experts see inputs scaled by their weights: a swapped expert cannot be
    re-weighed, so the one option that changes routing is refused, not silently wrong."""
    path = save_tiny_checkpoint("llama4", tmp_path)
    with pytest.raises(ConfigError, match="cache_aware_routing_margin"):
        LLM(model=str(path), max_model_len=64, cache_aware_routing_margin=0.5)


def test_release_with_int_temperature_tuning_serves(tmp_path: Path) -> None:
    """A folder whose config.json says attn_temperature_tuning=4 (the releases') loads, tokenizer
    included (transformers 5 reads config.json to pick it), and generates as with `true`."""
    path = save_tiny_checkpoint("llama4", tmp_path)
    prompt = [[1, *range(40, 60)]]
    want = LLM(model=str(path), max_model_len=64).generate(prompt, GREEDY)[0].outputs[0].token_ids
    raw = json.loads((path / "config.json").read_text())
    assert raw["attn_temperature_tuning"] is True
    (path / "config.json").write_text(json.dumps({**raw, "attn_temperature_tuning": 4}))
    got = LLM(model=str(path), max_model_len=64).generate(prompt, GREEDY)[0].outputs[0].token_ids
    assert got == want
