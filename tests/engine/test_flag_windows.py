"""Sliding windows that Mixtral's and Qwen2/Qwen3-MoE's config.json switch on by flags: served
with transformers' windows (they were silently full attention), and left off where official
releases leave them off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, ConfigError, SamplingParams
from engine.family_config import LocalAttention
from engine.model_config import ModelConfig
from tests.conftest import build_tokenizer, tiny_config
from tests.engine.test_models import assert_prefill_logits_match, hf_model

# Qwen/Qwen2-57B-A14B's config.json (as TensorRT-LLM's test_modeling_qwen_moe quotes it): a
# window is named but use_sliding_window is false, so transformers attends to everything.
QWEN2_57B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 2560,
    "norm_topk_prob": False,
    "num_attention_heads": 28,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "shared_expert_intermediate_size": 20480,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
WINDOWS = {  # a window of 4 keys, so that a 30-token prompt crosses it many times
    "mixtral": {"sliding_window": 4},  # Mixtral-8x7B's first config.json said 4096
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": 4},
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
}


def test_official_releases_attend_to_everything() -> None:
    cfg = ModelConfig.from_dict(QWEN2_57B)
    assert cfg.local_attention is None and cfg.local_layers == ()
    assert cfg.shared_expert_intermediate_size == 20480 and cfg.top_k == 8
    mixtral = {**QWEN2_57B, "model_type": "mixtral", "num_local_experts": 8, "sliding_window": None}
    assert ModelConfig.from_dict(mixtral).local_layers == ()


@pytest.mark.parametrize("family", list(WINDOWS))
def test_switched_on_windows_match_transformers(family: str, tmp_path: Path) -> None:
    config = tiny_config(family)
    for key, value in WINDOWS[family].items():
        setattr(config, key, value)
    if family == "qwen2_moe":
        config.layer_types = None  # re-derived from the window flags below
    config.__post_init__()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(tmp_path)
    want_layers = (0,) if family == "qwen2_moe" else tuple(range(cfg.num_layers))
    assert cfg.local_attention == LocalAttention(4) and cfg.local_layers == want_layers
    assert_prefill_logits_match(tmp_path)
    prompt = [1, *range(40, 70)]
    llm = LLM(model=str(tmp_path), max_model_len=64, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ours = llm.generate([prompt], params)[0].token_ids
    hf = hf_model(tmp_path)
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert ours == theirs[0, len(prompt) :].tolist()


@pytest.mark.parametrize("window", [0, -1, 4.5, True])
def test_bad_window_is_refused_by_name(window: object) -> None:
    raw = {**QWEN2_57B, "use_sliding_window": True, "sliding_window": window}
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig.from_dict(raw)
