"""Half-precision ops against transformers': from the same half-precision inputs, the engine's
result is no further from float32 than transformers' own (tests/engine/test_models.py compares
whole models, where route flips at near-ties make the error too noisy to show a small loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_update

from engine import LLM
from engine.models.gated_delta import conv_step
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_conv_as_close_to_float32_as_transformers(dtype: torch.dtype) -> None:
    """Gated DeltaNet's decode step convolves its cached inputs and the new one: summed in float32
    and rounded once, as transformers' causal_conv1d_update (F.conv1d) does. Rounding each
    product to half precision first was 1.3x as far from float32."""
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(64, 512, 3, generator=gen).to(dtype)  # [B, C, K - 1]
    new = torch.randn(64, 512, 1, generator=gen).to(dtype)
    weight = (0.5 * torch.randn(512, 4, generator=gen)).to(dtype)  # [C, K]
    window = torch.cat((state, new), dim=-1)
    exact = F.silu((window.double() * weight.double()).sum(-1))
    theirs = causal_conv1d_update(new, state.clone(), weight, None, "silu")[..., 0]
    err_ours = (conv_step(window, weight).double() - exact).abs().mean()
    err_theirs = (theirs.double() - exact).abs().mean()
    assert err_ours <= err_theirs * (1 + 4 * EPS32)
