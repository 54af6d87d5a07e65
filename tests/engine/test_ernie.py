"""ERNIE 4.5 MoE's config.json as the hub writes it; its forward is checked against
transformers by the family-parametrized tests (tests/conftest.py's tiny checkpoint)."""

from __future__ import annotations

import pytest
import torch

from engine import ConfigError
from engine.family_config import RouterConfig
from engine.model_config import ModelConfig
from engine.models.router import Router


def ernie_21b() -> dict:
    """ERNIE-4.5-21B-A3B-PT's config.json (the fields we read)."""
    return {
        "model_type": "ernie4_5_moe",
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "max_position_embeddings": 131072,
        "moe_intermediate_size": 1536,
        "moe_k": 6,
        "moe_layer_interval": 1,
        "moe_layer_start_index": 1,
        "moe_num_experts": 64,
        "moe_num_shared_experts": 2,
        "num_attention_heads": 20,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000,
        "use_bias": False,
        "vocab_size": 103424,
    }


def test_hub_config_reads_as_transformers_builds_it() -> None:
    cfg = ModelConfig.from_dict(ernie_21b())
    assert cfg.dense_layers == (0,) and cfg.dense_intermediate_size == 12288
    assert cfg.num_experts == 64 and cfg.top_k == 6 and cfg.moe_intermediate_size == 1536
    assert cfg.shared_expert_intermediate_size == 2 * 1536 and not cfg.shared_expert_gated
    assert cfg.router.topk_method == "noaux_tc" and cfg.router.scoring == "softmax"
    assert cfg.router.normalize and cfg.router.float32_logits
    assert cfg.rope_interleaved and cfg.rope_float32 and cfg.head_dim == 128
    assert cfg.tie_word_embeddings  # transformers' default for ERNIE, left out of the file


def test_moe_layers_by_start_end_and_interval() -> None:
    raw = ernie_21b() | {"moe_layer_start_index": 2, "moe_layer_end_index": 9}
    raw |= {"moe_layer_interval": 2, "num_hidden_layers": 12}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.moe_layers == (3, 5, 7, 9)


def test_biases_on_every_projection_are_refused() -> None:
    with pytest.raises(ConfigError, match="use_bias"):
        ModelConfig.from_dict(ernie_21b() | {"use_bias": True})


def test_ranking_and_probabilities_pick_with_the_correction_bias() -> None:
    """Softmax scores plus a bias pick the experts: cache-aware routing's ranking and what
    predictors learn from must order them the same way (expert 1 wins by its bias)."""
    cfg = RouterConfig(top_k=2, normalize=True, topk_method="noaux_tc", float32_logits=True)
    router = Router(cfg, 4, 4)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    logits, _, ids = router(torch.tensor([[2.0, 0.0, 1.9, -3.0]]))
    assert sorted(ids[0].tolist()) == [0, 1]
    key, _ = router.ranking(logits)
    assert sorted(key.topk(2).indices[0].tolist()) == [0, 1]
    assert sorted(router.probabilities(logits).topk(2).indices[0].tolist()) == [0, 1]


@pytest.mark.parametrize(
    ("raw", "theta"),
    [
        (ernie_21b(), 500000.0),
        ({**ernie_21b(), "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}, 7.0),
    ],
    ids=["class-default", "rope-parameters"],
)
def test_a_rotary_base_left_out_is_transformers_default(raw: dict, theta: float) -> None:
    raw = {k: v for k, v in raw.items() if k != "rope_theta"}
    assert ModelConfig.from_dict(raw).rope_theta == theta
