"""`kv_cache_dtype="fp8"`: the KV cache holds FP8, twice the tokens in the same bytes. Every query
attends over the rounded keys and values, new or cached, so outputs do not depend on chunking, KV
pressure or the prefix cache; they stay close to a full-precision cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import LLM, ConfigError, SamplingParams, kv_cache
from tests.conftest import GreedyRun, Preemptions, save_tiny_checkpoint

PROMPT = [1, 300, 12, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59]


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])  # GQA, latent, sinks
def test_fp8_outputs_do_not_depend_on_chunks_pressure_or_prefix_cache(
    family: str,
    device: str,
    tmp_path: Path,
    greedy_run: GreedyRun,
    preemptions: Callable[[LLM], Preemptions],
) -> None:
    path = save_tiny_checkpoint(family, tmp_path)
    fp8 = {"kv_cache_dtype": "fp8", "device": device}
    whole, llm = greedy_run(path, **fp8, enable_prefix_caching=False)
    assert llm.engine.kv.cache_dtype == torch.float8_e4m3fn
    chunked, _ = greedy_run(path, **fp8, max_num_batched_tokens=3)
    tight = LLM(model=str(path), max_model_len=64, kv_cache_blocks=4, **fp8)
    watched = preemptions(tight)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[1, 5, 9, 200, 31], [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53], [1, 300], [1, 12]]
    pressed = [o.token_ids for o in tight.generate(prompts, params)]
    again = [o.token_ids for o in tight.generate(prompts, params)]  # from the prefix cache
    assert chunked == whole and pressed[:3] == whole[:3] and again == pressed
    assert watched.count > 0 and tight.engine.blocks.num_used == 0


@pytest.mark.parametrize(("kv_cache_dtype", "bound"), [("fp8", 0.05), ("fp8_e5m2", 0.2)])
def test_fp8_scores_stay_close_to_a_full_precision_cache(
    mixtral_checkpoint: Path, kv_cache_dtype: str, bound: float
) -> None:
    """Each prompt token's log-probability, read through the cache in chunks of 4: close to the
    float32 cache's (e5m2 keeps 2 mantissa bits to e4m3's 3), and not equal (the rounding is
    real)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def scores(**flags: object) -> torch.Tensor:
        llm = LLM(
            model=str(mixtral_checkpoint), max_model_len=64, max_num_batched_tokens=4, **flags
        )
        entries = llm.generate([PROMPT], params)[0].prompt_logprobs or []
        return torch.tensor([e.logprob for e in entries[1:] if e is not None])

    exact, rounded = scores(), scores(kv_cache_dtype=kv_cache_dtype)
    assert len(exact) == len(PROMPT) - 1
    assert 0 < (exact - rounded).abs().max() < bound


def test_fp8_holds_twice_the_tokens_and_bad_names_are_refused(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a KV memory budget that binds (here 1 MiB), an FP8 cache holds 4x float32's blocks."""
    monkeypatch.setattr(kv_cache, "DEFAULT_KV_BYTES", 1 << 20)
    blocks = {
        dtype: LLM(model=str(mixtral_checkpoint), kv_cache_dtype=dtype).engine.blocks.num_blocks
        for dtype in ("auto", "fp8")
    }
    assert blocks["fp8"] == 4 * blocks["auto"]
    with pytest.raises(ConfigError, match="kv_cache_dtype='int4'"):
        LLM(model=str(mixtral_checkpoint), kv_cache_dtype="int4")
