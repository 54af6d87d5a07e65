"""Every family against transformers' own forward on the same tiny checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import engine.attention_sinks as attention_sinks
from engine import LLM, SamplingParams
from engine.family_config import LocalAttention
from engine.models import mla
from tests.conftest import Preemptions, build_tokenizer, save_tiny_checkpoint, tiny_config

PROMPTS = [
    [1, 17, 99, 240, 5],
    [1, 300, 12, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59],
    [1, 7],
    [1, 200, 201, 202, 203, 204, 205, 206, 207],
]


def hf_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_prefill_logits_match(checkpoint: Path) -> None:
    llm = LLM(model=str(checkpoint), max_model_len=256)
    engine = llm.engine
    ids = PROMPTS[1]
    assert engine.blocks.grow(-1, len(ids))
    batch = engine.runner.prefill_batch([len(ids)], *engine.block_tables([-1]))
    with torch.inference_mode():
        hidden = engine.model(
            torch.tensor(ids), torch.arange(len(ids)), batch, engine.offload.experts
        )
        ours = engine.model.logits(hidden)  # [T, V]
        theirs = hf_model(checkpoint)(torch.tensor([ids])).logits[0]
    assert ours.std() > 0.1, "logits too flat for a meaningful comparison"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_prefill_logits_match_transformers(tiny_checkpoint: Path) -> None:
    assert_prefill_logits_match(tiny_checkpoint)


def test_olmoe_clip_qkv_matches_transformers(tmp_path: Path) -> None:
    """OLMoE clamps q, k and v after its q/k norms; a small clip makes the clamp bite."""
    config = tiny_config("olmoe")
    config.clip_qkv = 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert_prefill_logits_match(tmp_path)


@pytest.mark.parametrize(
    ("family", "changes"),
    [
        ("deepseek_v2", {"attention_bias": True}),  # biases on the interleaved rotary rows too
        ("deepseek_v3", {"rope_interleave": False}),  # rotary over halves, as the others
        ("deepseek_v3", {"first_k_dense_replace": 0, "topk_group": 4}),  # no dense, no limit
    ],
    ids=["v2-attention-bias", "v3-halves-rope", "v3-all-moe-all-groups"],
)
def test_deepseek_variants_match_transformers(
    family: str, changes: dict[str, object], tmp_path: Path
) -> None:
    config = tiny_config(family)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert_prefill_logits_match(tmp_path)


def test_glm4_moe_hub_config_matches_transformers(tmp_path: Path) -> None:
    """GLM-4.5's released config.json: rotary fields at the top level (no `rope_parameters`), a
    quarter of each head turned here, no q/k norms, and routing over all groups."""
    config = tiny_config("glm4_moe")
    config.use_qk_norm, config.n_group = False, 1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["rope_parameters"]
    raw |= {"partial_rotary_factor": 0.25, "rope_theta": 500.0, "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert LLM(model=str(tmp_path), max_model_len=32).engine.model_config.rotary_dim == 6
    assert_prefill_logits_match(tmp_path)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_routing_fields_left_out_take_transformers_defaults(family: str, tmp_path: Path) -> None:
    """A config.json without norm_topk_prob, n_shared_experts, first_k_dense_replace or
    routed_scaling_factor means what transformers assumes (they differ by family); and where
    both say, `rope_parameters`' rotary factor wins over the top level's, as in transformers."""
    config = tiny_config(family)
    config.num_hidden_layers = 4  # V3's 3 dense layers, then one MoE layer
    config.first_k_dense_replace = 3 if family == "deepseek_v3" else 1
    config.n_shared_experts, config.norm_topk_prob = 1, True
    config.routed_scaling_factor = 2.5 if family == "deepseek_v3" else 1.0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("norm_topk_prob", "n_shared_experts", "first_k_dense_replace"):
        del raw[key]
    del raw["routed_scaling_factor"]
    if family == "glm4_moe":
        raw["partial_rotary_factor"] = 0.25  # rope_parameters says 0.5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert_prefill_logits_match(tmp_path)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


@pytest.mark.parametrize(
    ("family", "rope"),
    [
        ("mixtral", YARN),
        ("qwen3_moe", {"rope_type": "linear", "factor": 2.0}),
        (
            "olmoe",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        ),
        ("deepseek_v2", {**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}),  # V2-Lite's kind
    ],
    ids=["yarn", "linear", "llama3", "deepseek-yarn"],
)
def test_scaled_rotary_matches_transformers(
    family: str, rope: dict[str, object], tmp_path: Path
) -> None:
    config = tiny_config(family)
    config.rope_parameters = {**rope, "rope_theta": 10000.0}
    if getattr(config, "head_dim", 0) is None:  # transformers' own YaRN cannot read Mixtral's null
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert_prefill_logits_match(tmp_path)


def test_latent_attention_caches_one_latent_per_token(tmp_path: Path) -> None:
    """MLA caches [kv_lora_rank + qk_rope_head_dim] per token and layer, and no value tensor."""
    llm = LLM(model=str(save_tiny_checkpoint("deepseek_v2", tmp_path)), max_model_len=64)
    mla = llm.engine.model_config.mla
    assert mla is not None
    assert llm.engine.kv.v == []
    assert llm.engine.kv.k[0].shape[1:] == (1, mla.kv_lora_rank + mla.qk_rope_head_dim)


@pytest.mark.parametrize("limit", ["default", "sliced", "over-budget"])
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_in_chunks_matches_transformers(
    family: str, limit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 100-token prompt in chunks of 40: the second attends expanded over the cached first, the
    third (20 queries, too few to pay for expanding its context) absorbed. Every position's
    log-probability matches transformers' forward of the whole prompt: also with the expanded
    queries a few at a time ("sliced"), and with every chunk absorbed ("over-budget", where the
    context's expanded keys and values would not fit)."""
    if limit == "sliced":
        monkeypatch.setattr(mla, "MAX_FOLDED_MASK", 1000)
    elif limit == "over-budget":
        monkeypatch.setattr(mla, "MAX_EXPANDED_KV", 10)
    checkpoint = save_tiny_checkpoint(family, tmp_path)
    llm = LLM(model=str(checkpoint), max_model_len=128, max_num_batched_tokens=40)
    assert 20 < llm.engine.model.model.layers[0].self_attn.expand_min_queries <= 40
    prompt = [1, *range(20, 119)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    [out] = llm.generate([prompt], params)
    assert out.prompt_logprobs is not None
    ours = torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]])
    with torch.no_grad():
        logits = hf_model(checkpoint)(torch.tensor([prompt])).logits[0]  # [T, V]
    theirs = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_cache_blocks", [None, 4], ids=["roomy-kv", "preempting-kv"])
def test_batched_greedy_matches_transformers_generate(
    tiny_checkpoint: Path,
    kv_cache_blocks: int | None,
    preemptions: Callable[[LLM], Preemptions],
) -> None:
    # 4 blocks of 16 tokens hold ~two sequences: the batch must preempt and recompute to finish.
    llm = LLM(
        model=str(tiny_checkpoint),
        max_model_len=64,
        kv_cache_blocks=kv_cache_blocks,
        max_num_batched_tokens=24,
    )
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    watched = preemptions(llm)
    outs = llm.generate(PROMPTS, params)
    hf = hf_model(tiny_checkpoint)
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS may be generated, never stops
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out.token_ids == ref
    if kv_cache_blocks is not None:
        assert watched.count > 0
    assert llm.engine.blocks.num_used == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close_to_transformers(tiny_checkpoint: Path, dtype: str) -> None:
    llm = LLM(model=str(tiny_checkpoint), max_model_len=64, dtype=dtype)
    engine = llm.engine
    ids = PROMPTS[1]
    assert engine.blocks.grow(-1, len(ids))
    batch = engine.runner.prefill_batch([len(ids)], *engine.block_tables([-1]))
    torch_dtype = getattr(torch, dtype)
    with torch.inference_mode():
        hidden = engine.model(
            torch.tensor(ids), torch.arange(len(ids)), batch, engine.offload.experts
        )
        ours = engine.model.logits(hidden)
        hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch_dtype).eval()
        theirs = hf(torch.tensor([ids])).logits[0].float()
    assert hidden.dtype == torch_dtype
    # Half-precision rounding may flip a near-tied route at a token (Qwen2-MoE, bf16: one token of
    # 19 off by 0.19; DeepSeek-V2, bf16: two, off by 0.36 and 0.13 against float32, the rest within
    # 0.05, as close to float32 as transformers' own bf16); a systematic error would move every
    # token.
    close = torch.isclose(ours, theirs, atol=0.1, rtol=0.05)  # [T, V]
    off = (~close).any(dim=1)  # [T] tokens with any logit out of tolerance
    assert off.sum() <= 2, f"{off.sum()} of {len(off)} tokens differ"


@pytest.mark.parametrize("slices", ["whole", "sliced"])
def test_sinks_and_windows_in_chunks_match_transformers(
    slices: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpt-oss's sinks and 4-key windows over a 100-token prompt in chunks of 40, each chunk
    attending over the cached ones (and, "sliced", a few queries at a time): every position's
    log-probability matches transformers' forward of the whole prompt. Then greedy tokens, twice:
    the second time the prompt's leading blocks come from the prefix cache."""
    if slices == "sliced":
        monkeypatch.setattr(attention_sinks, "MAX_MASK", 500)
    checkpoint = save_tiny_checkpoint("gpt_oss", tmp_path)
    llm = LLM(model=str(checkpoint), max_model_len=128, max_num_batched_tokens=40)
    prompt = [1, *range(20, 119)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    [out] = llm.generate([prompt], params)
    assert out.prompt_logprobs is not None
    ours = torch.tensor([entry.logprob for entry in out.prompt_logprobs[1:]])
    hf = hf_model(checkpoint)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0]  # [T, V]
    theirs = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    hf.generation_config.eos_token_id = None
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        [out] = llm.generate([prompt], greedy)
        assert out.token_ids == ref[0, len(prompt) :].tolist()
    assert llm.engine.metrics.prefix_hits._value.get() > 0


def test_gpt_oss_hub_config_matches_transformers(tmp_path: Path) -> None:
    """OpenAI's released config.json: YaRN under `rope_scaling` with `rope_theta` beside it, no
    `swiglu_alpha` (1.702 by default), `experts_per_token` beside `num_experts_per_tok`."""
    checkpoint = save_tiny_checkpoint("gpt_oss", tmp_path)
    raw = json.loads((checkpoint / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw |= {"rope_scaling": rope, "experts_per_token": 2, "initial_context_length": 128}
    del raw["swiglu_alpha"]
    (checkpoint / "config.json").write_text(json.dumps(raw))
    cfg = LLM(model=str(checkpoint), max_model_len=32).engine.model_config
    assert (
        cfg.gating.alpha == 1.702
        and cfg.local_layers == (0, 2)
        and cfg.local_attention == LocalAttention(4)
    )
    assert_prefill_logits_match(checkpoint)


def test_minimax_m2_hub_config_matches_transformers(tmp_path: Path) -> None:
    """MiniMax-M2's released config.json: `rotary_dim` and `rope_theta` at the top level (no
    `rope_parameters`), and the routing fields its code reads (`scoring_func`,
    `use_routing_bias`)."""
    checkpoint = save_tiny_checkpoint("minimax_m2", tmp_path)
    raw = json.loads((checkpoint / "config.json").read_text())
    del raw["rope_parameters"]
    raw |= {"rotary_dim": 4, "rope_theta": 5e6, "scoring_func": "sigmoid", "use_routing_bias": True}
    raw |= {"use_qk_norm": True, "qk_norm_type": "per_layer"}
    (checkpoint / "config.json").write_text(json.dumps(raw))
    cfg = LLM(model=str(checkpoint), max_model_len=32).engine.model_config
    assert cfg.rotary_dim == 4 and cfg.router.correction_bias and cfg.qk_norm == "full"
    assert_prefill_logits_match(checkpoint)


def test_kimi_k2_is_read_as_deepseek_v3(tmp_path: Path) -> None:
    """Kimi-K2's config.json names model_type `kimi_k2` for DeepSeek-V3's architecture (its config
    class lives on the hub, not in transformers): the same checkpoint gives the same logits."""
    original = save_tiny_checkpoint("deepseek_v3", tmp_path / "v3")
    kimi = tmp_path / "kimi"
    kimi.mkdir()
    for f in original.iterdir():
        (kimi / f.name).write_bytes(f.read_bytes())
    raw = json.loads((kimi / "config.json").read_text())
    (kimi / "config.json").write_text(json.dumps({**raw, "model_type": "kimi_k2"}))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    logprobs = []
    for path in (original, kimi):
        [out] = LLM(model=str(path), max_model_len=64).generate([PROMPTS[1]], params)
        assert out.prompt_logprobs is not None
        logprobs.append([entry.logprob for entry in out.prompt_logprobs[1:]])
    assert logprobs[0] == logprobs[1]
