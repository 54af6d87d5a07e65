"""Defaults that depend on the checkpoint (engine/settle.py): the serving dtype of `--dtype auto`,
and how many sequences a linear-attention model runs at once when --max-num-seqs is not given
(its per-sequence states, and as many prefix-caching snapshots, are allocated at start, so the
default keeps them within a budget, as the default KV budget keeps the attention layers')."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine import settle as settle_module
from engine.config import DEFAULT_MAX_NUM_SEQS, ConfigError, serving_dtype
from engine.linear_state import LinearStates
from engine.model_config import ModelConfig
from engine.settle import context_length, with_max_num_seqs
from tests.conftest import save_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 17, 99, 240, 5], [1, 300, 12, 44], [1, 7], [1, *range(100, 121)], [1, 9, 9]]


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("qwen3_next", tmp_path_factory.mktemp("qwen3_next"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_is_what_one_slot_allocates(next_checkpoint: Path, dtype: torch.dtype) -> None:
    linear = ModelConfig.from_pretrained(next_checkpoint).linear_attention
    assert linear is not None
    one_slot = LinearStates(linear, 1, dtype, "cpu")
    assert linear.state_bytes(dtype.itemsize) == one_slot.nbytes
    with_snapshot = LinearStates(linear, 1, dtype, "cpu", num_snapshots=1)
    assert with_snapshot.nbytes == 2 * one_slot.nbytes


def test_default_seats_fit_the_state_budget(
    next_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mc = ModelConfig.from_pretrained(next_checkpoint)
    assert mc.linear_attention is not None
    per_slot = mc.linear_attention.state_bytes(4)  # float32
    assert with_max_num_seqs(mc, EngineConfig()).max_num_seqs == DEFAULT_MAX_NUM_SEQS  # tiny
    monkeypatch.setattr(settle_module, "DEFAULT_STATE_BYTES", 7 * per_slot)
    assert with_max_num_seqs(mc, EngineConfig()).max_num_seqs == 3  # a state and a snapshot each
    no_snapshots = EngineConfig(enable_prefix_caching=False)
    assert with_max_num_seqs(mc, no_snapshots).max_num_seqs == 7
    assert with_max_num_seqs(mc, EngineConfig(max_num_seqs=12)).max_num_seqs == 12  # as asked
    monkeypatch.setattr(settle_module, "DEFAULT_STATE_BYTES", per_slot // 2)
    assert with_max_num_seqs(mc, EngineConfig()).max_num_seqs == 1  # never none


def test_models_without_linear_attention_keep_the_default(tmp_path: Path) -> None:
    mc = ModelConfig.from_pretrained(save_tiny_checkpoint("mixtral", tmp_path / "mixtral"))
    assert with_max_num_seqs(mc, EngineConfig()).max_num_seqs == DEFAULT_MAX_NUM_SEQS


def test_engine_runs_more_requests_than_its_budgeted_seats(
    next_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = [o.token_ids for o in LLM(model=str(next_checkpoint)).generate(PROMPTS, GREEDY)]
    mc = ModelConfig.from_pretrained(next_checkpoint)
    assert mc.linear_attention is not None
    per_seq = 2 * mc.linear_attention.state_bytes(4)
    monkeypatch.setattr(settle_module, "DEFAULT_STATE_BYTES", 2 * per_seq)
    llm = LLM(model=str(next_checkpoint))
    engine = llm.engine
    assert engine.config.max_num_seqs == 2
    assert engine.runner.states is not None and engine.runner.states.num_free == 2
    assert engine.runner.states.nbytes == 2 * per_seq
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    engine.step()
    assert len(engine.scheduler.running) == 2  # the rest wait for a state
    while engine.has_unfinished():
        engine.step()
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    assert engine.runner.states.num_free == 2


def test_token_group_check_waits_for_the_settled_seats(
    next_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token group that could not serve 64 decodes in time can serve the seats a hybrid model
    settles on; with them too many, the engine refuses as it would for an explicit value."""
    flags = {"token_scheduler": "expertflow", "token_group_size": 2, "max_defer_steps": 1}
    EngineConfig(**flags)  # not refused before the model says how many sequences run
    mc = ModelConfig.from_pretrained(next_checkpoint)
    assert mc.linear_attention is not None
    per_seq = 2 * mc.linear_attention.state_bytes(4)
    monkeypatch.setattr(settle_module, "DEFAULT_STATE_BYTES", 4 * per_seq)
    assert with_max_num_seqs(mc, EngineConfig(**flags)).max_num_seqs == 4
    monkeypatch.setattr(settle_module, "DEFAULT_STATE_BYTES", 5 * per_seq)
    with pytest.raises(ValueError, match="max_num_seqs=5"):
        with_max_num_seqs(mc, EngineConfig(**flags))


@pytest.mark.parametrize(
    ("requested", "device", "checkpoint", "served"),
    [
        ("auto", "cpu", "bfloat16", "float32"),  # no fast half precision on the CPU
        ("auto", "cuda", "bfloat16", "bfloat16"),
        ("auto", "cuda", "float16", "float16"),  # GPTQ and AWQ releases
        ("auto", "cuda", "float32", "bfloat16"),  # a 32-bit checkpoint served in 16 bits
        ("auto", "cuda", None, "bfloat16"),
        ("float16", "cpu", "bfloat16", "float16"),  # as asked
    ],
)
def test_auto_dtype_serves_the_checkpoints_on_cuda_float32_on_the_cpu(
    requested: str, device: str, checkpoint: str | None, served: str
) -> None:
    assert serving_dtype(requested, device, checkpoint) == served


def test_the_engine_settles_auto_from_config_json(tmp_path: Path) -> None:
    path = save_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    assert ModelConfig.from_pretrained(path).checkpoint_dtype == "float32"
    engine = LLM(model=str(path), max_model_len=64).engine
    assert engine.config.dtype == "float32" and engine.kv.dtype == torch.float32
    assert EngineConfig().torch_dtype == torch.float32  # unsettled, on the CPU


def test_the_context_is_the_models_and_holds_a_block(tmp_path: Path) -> None:
    """A block larger than the context is never filled, yet each sequence holds a whole one: the
    default cache fitted 4 of 64 sequences at once and every step attended over the empty rest."""
    mc = ModelConfig.from_pretrained(save_tiny_checkpoint("mixtral", tmp_path / "mixtral"))
    assert context_length(mc, EngineConfig()) == mc.max_position_embeddings == 512
    assert context_length(mc, EngineConfig(max_model_len=64, block_size=64)) == 64
    with pytest.raises(ConfigError, match="max_model_len=1024 exceeds the model's"):
        context_length(mc, EngineConfig(max_model_len=1024))
    with pytest.raises(ConfigError, match="block_size=1024 exceeds max_model_len=512"):
        context_length(mc, EngineConfig(block_size=1024))
    with pytest.raises(ConfigError, match="block_size=128 exceeds max_model_len=64"):
        context_length(mc, EngineConfig(max_model_len=64, block_size=128))
