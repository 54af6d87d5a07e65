"""Shared fixtures: tiny random checkpoints of every family, saved as real Hugging Face folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Ernie4_5_MoeConfig,
    Glm4MoeConfig,
    Glm4MoeLiteConfig,
    GptOssConfig,
    Llama4TextConfig,
    MiniMaxM2Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3_5MoeConfig,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)

from engine import LLM, SamplingParams
from engine.model_config import SUPPORTED_FAMILIES

# One torch thread per process: the server subprocess and the test process share 2 cores, and
# oversubscribed threads slow small matmuls down by orders of magnitude.
torch.set_num_threads(1)

FAMILIES = SUPPORTED_FAMILIES
VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "import torch\nx = torch.zeros(3)\nprint(x)\n",
] * 20


def tiny_config(family: str) -> PretrainedConfig:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        return MixtralConfig(
            **common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
        )
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **{**common, "num_hidden_layers": 3},
            intermediate_size=48,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            head_dim=16,
            intermediate_size=48,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    if family == "olmoe":
        return OlmoeConfig(**common, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if family == "glm4_moe":  # GLM-4.5's shape: half-head rotary, biases, q/k norms, V3's routing
        return Glm4MoeConfig(
            **{**common, "num_hidden_layers": 3},
            head_dim=24,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            attention_bias=True,
            use_qk_norm=True,
            routed_scaling_factor=2.5,
        )
    if family == "gpt_oss":  # a window of 4 keys and strong sinks, so that both show
        return GptOssConfig(
            **{**common, "num_hidden_layers": 3},
            head_dim=16,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=4,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 128,
            },
        )
    if family == "minimax_m2":  # half-head rotary, q/k norms over all heads, biased sigmoid routing
        return MiniMaxM2Config(
            **common,
            head_dim=16,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "partial_rotary_factor": 0.5,
            },
        )
    if family == "llama4":  # chunks of 8 on the rotary layers; dense, MoE, dense, NoPE + MoE
        return Llama4TextConfig(
            **{**common, "num_hidden_layers": 4},
            head_dim=16,
            intermediate_size=32,
            intermediate_size_mlp=48,
            num_local_experts=8,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            attention_chunk_size=8,
            floor_scale=4,
            attn_scale=0.5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "ernie4_5_moe":  # a dense first layer, tied embeddings (its default)
        return Ernie4_5_MoeConfig(
            **{**common, "num_hidden_layers": 3, "tie_word_embeddings": True},
            intermediate_size=48,
            moe_intermediate_size=32,
            moe_num_experts=8,
            moe_k=2,
            moe_num_shared_experts=1,
        )
    hybrid = dict(  # three Gated DeltaNet layers, then gated attention
        num_hidden_layers=4,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=12,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=2,
    )
    if family == "qwen3_next":  # a dense layer too; top-k not renormalised
        return Qwen3NextConfig(
            **{**common, **hybrid}, intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False
        )
    if family == "qwen3_5_moe":  # the text model of Qwen3.5's VL release
        return Qwen3_5MoeConfig(text_config={**common, **hybrid}).text_config
    latent = dict(
        num_key_value_heads=4,
        num_hidden_layers=3,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
    )
    if family == "glm4_moe_lite":  # GLM-4.7-Flash: V3's architecture, dense layers by type
        return Glm4MoeLiteConfig(
            **{**common, **latent},
            q_lora_rank=24,
            routed_scaling_factor=1.8,
            mlp_layer_types=["dense", "sparse", "sparse"],
        )
    if family == "deepseek_v2":  # V2-Lite's shape: one q_proj; V2's grouped routing
        return DeepseekV2Config(
            **{**common, **latent}, q_lora_rank=None, topk_method="group_limited_greedy"
        )
    if family == "deepseek_v3":  # q LoRA, sigmoid scores with a correction bias, scaled weights
        return DeepseekV3Config(**{**common, **latent}, q_lora_rank=24, routed_scaling_factor=2.5)
    raise ValueError(family)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # zero at init: make it pick experts
            buffer.normal_(0.0, 0.3)
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias"):  # ERNIE's is a parameter
            param.data.normal_(0.0, 0.3)
        if name.endswith(("sinks", "_proj_bias")):  # gpt-oss's: make them matter
            param.data.normal_(0.0, 1.0)
        if family in ("qwen3_next", "qwen3_5_moe") and name.endswith(("norm.weight", "dt_bias")):
            param.data.normal_(0.0, 0.5)  # zero-centred norms (1 + w), the decay's bias
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny random checkpoint folder, one per family."""
    return save_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def mixtral_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral-single"))


GreedyRun = Callable[..., tuple[list[list[int]], LLM]]  # see `greedy_run`


@pytest.fixture(scope="session")
def greedy_run() -> GreedyRun:
    """`greedy_run(checkpoint, **engine_flags)` -> (token ids per prompt, the LLM): four prompts of
    mixed lengths, 12 greedy tokens each, what the invariance tests compare across engine flags."""
    prompts = [
        [1, 5, 9, 200, 31],
        [1, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53],
        [1, 300],
        [1, 12, 13, 14],
    ]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run(path: Path, **flags: object) -> tuple[list[list[int]], LLM]:
        llm = LLM(model=str(path), max_model_len=64, **flags)
        return [o.token_ids for o in llm.generate(prompts, params)], llm

    return run


class Preemptions:
    """Counts the sequences an LLM's scheduler preempts from now on (wraps its `schedule`)."""

    def __init__(self, llm: LLM) -> None:
        self.count = 0
        original = llm.engine.scheduler.schedule

        def schedule():  # noqa: ANN202
            batch = original()
            self.count += len(batch.preempted)
            return batch

        llm.engine.scheduler.schedule = schedule  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def preemptions() -> Callable[[LLM], Preemptions]:
    """`preemptions(llm).count`: what the tests under KV pressure check actually happened."""
    return Preemptions
