"""Half-precision ops against transformers': from the same half-precision inputs, the engine's
result is no further from float32 than transformers' own (tests/engine/test_models.py compares
whole models, where route flips at near-ties make the error too noisy to show a small loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM
from tests.conftest import save_tiny_checkpoint

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize(
    "family", ["deepseek_v2", "deepseek_v3", "glm4_moe_lite", "glm4_moe", "ernie4_5_moe"]
)
def test_router_logits_as_close_to_float32_as_transformers(family: str, tmp_path: Path) -> None:
    """These families' routers keep a float32 weight in bfloat16 models, in transformers
    (`_keep_in_fp32_modules_strict`) and here: a weight rounded to bfloat16 moved every router
    logit of a float32 checkpoint served in bfloat16."""
    path = save_tiny_checkpoint(family, tmp_path)
    layer = 1  # each family's first MoE layer
    ours = LLM(model=str(path), max_model_len=32, dtype="bfloat16").engine.model
    router = ours.model.layers[layer].mlp.gate
    exact, theirs = (
        AutoModelForCausalLM.from_pretrained(path, dtype=d).model.layers[layer].mlp.gate
        for d in (torch.float32, torch.bfloat16)
    )
    x = torch.randn(256, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)  # the same half-precision input to all three
    with torch.no_grad():
        ref = exact(x.float())[0]
        err_ours = (router(x)[0] - ref).abs().max()
        err_theirs = (theirs(x)[0].float() - ref).abs().max()
    assert router.weight.dtype == torch.float32
    assert err_ours <= err_theirs + 8 * EPS32 * ref.abs().max()  # float32 rounding, no more
