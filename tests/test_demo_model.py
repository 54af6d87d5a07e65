"""The bundled demo model (models/expertflow-demo) is a genuine Hugging Face Mixtral folder that
loads, chats, fits the repository, and has learned both text and routing: it is every CPU test's
default `--model`, so a broken or untrained checkpoint must fail here first."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    MixtralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEMO = Path(__file__).resolve().parent.parent / "models" / "expertflow-demo"
MAX_FOLDER_BYTES = 25 * 10**6
SNIPPET_TOKENS = 256


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def heldout_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The opening tokens of three stdlib files the model never trained on. [3, SNIPPET_TOKENS]"""
    report = json.loads((DEMO / "training_report.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for rel in report["heldout_files"]:
        path = stdlib / rel
        ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"] if path.exists() else []
        if len(ids) >= SNIPPET_TOKENS:
            rows.append(ids[:SNIPPET_TOKENS])
        if len(rows) == 3:
            break
    assert len(rows) == 3, "fewer than 3 held-out stdlib files found"
    return torch.tensor(rows)


def test_config_is_a_small_mixtral() -> None:
    config = AutoConfig.from_pretrained(DEMO)
    assert isinstance(config, MixtralConfig)
    assert 8 <= config.num_local_experts <= 16
    assert config.num_experts_per_tok == 2
    assert 4 <= config.num_hidden_layers <= 6


def test_folder_fits_the_repository() -> None:
    assert sum(f.stat().st_size for f in DEMO.iterdir()) <= MAX_FOLDER_BYTES


def test_safetensors_use_hub_per_expert_keys() -> None:
    config = AutoConfig.from_pretrained(DEMO)
    with safe_open(DEMO / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    moe = "model.layers.{}.block_sparse_moe"
    expected = {
        f"{moe.format(layer)}.experts.{e}.{w}.weight"
        for layer in range(config.num_hidden_layers)
        for e in range(config.num_local_experts)
        for w in ("w1", "w2", "w3")
    } | {f"{moe.format(layer)}.gate.weight" for layer in range(config.num_hidden_layers)}
    assert expected <= keys
    assert not [k for k in keys if "gate_up_proj" in k or "down_proj" in k or ".mlp." in k]


def test_chat_template_and_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does len do?"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhat does len do?<|end|>\n<|assistant|>\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.eos_token_id) == 2  # one per finished turn
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # plain prompts get BOS
    config = json.loads((DEMO / "config.json").read_text())
    generation = json.loads((DEMO / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id
    assert config["vocab_size"] == len(tokenizer)


def test_heldout_loss_beats_uniform(model: PreTrainedModel, heldout_ids: torch.Tensor) -> None:
    with torch.no_grad():
        out = model(input_ids=heldout_ids, labels=heldout_ids)
    assert torch.isfinite(out.logits).all()
    assert out.loss.item() < 0.65 * math.log(model.config.vocab_size)  # 4.5 vs ln V = 8.3


def test_routing_is_learned(model: PreTrainedModel, heldout_ids: torch.Tensor) -> None:
    """Skewed, uncollapsed expert load, and one-layer-ahead pre-gate recall (as the card defines
    it) far above chance (k/E = 0.125) and above the same model's at random init (about 0.54)."""
    layers, c = model.model.layers, model.config
    k, n_experts = c.num_experts_per_tok, c.num_local_experts
    residuals: list[torch.Tensor] = []  # MoE input before its norm, per layer, [T, H]
    hooks = [
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, args: residuals.append(args[0].reshape(-1, c.hidden_size))
        )
        for layer in layers
    ]
    with torch.no_grad():
        model(input_ids=heldout_ids)
        for hook in hooks:
            hook.remove()

        def topk(target: int, residual: torch.Tensor) -> torch.Tensor:
            norm, gate = layers[target].post_attention_layernorm, layers[target].mlp.gate
            return F.linear(norm(residual), gate.weight).topk(k, dim=-1).indices  # [T, k]

        actual = [topk(i, residuals[i]) for i in range(len(layers))]
        recall = [
            (topk(i, residuals[i - 1])[:, :, None] == actual[i][:, None, :]).any(1).float().mean()
            for i in range(1, len(layers))
        ]
    shares = [torch.bincount(a.flatten(), minlength=n_experts) / a.numel() for a in actual]
    assert max(s.max().item() for s in shares) > 2 / n_experts  # some expert gets 2x its share
    assert min(s.max().item() for s in shares) < 0.9  # no layer collapsed onto one expert
    assert torch.stack(recall).mean().item() > 0.65  # 0.74 when trained
