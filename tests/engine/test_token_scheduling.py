"""Token scheduling regroups decodes across steps without changing outputs or starving anyone."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError, EngineConfig
from scheduler.step_selector import StepSelector

PROMPTS = [[1, 5 + i, 9, 200 - i, 31 + 2 * i] for i in range(12)]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def greedy(path: Path, **flags: object) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=str(path), max_model_len=64, max_num_seqs=12, **flags)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)], llm


@pytest.mark.parametrize(
    "flags",
    [
        {"token_scheduler": "fcfs", "token_group_size": 4, "max_defer_steps": 2},
        {"token_scheduler": "expertflow", "token_group_size": 4, "max_defer_steps": 2},
        {
            "token_scheduler": "expertflow",
            "expert_cache_ratio": 0.5,
            "predictor": "pregate",
            "resident_first": True,
        },
    ],
    ids=["fcfs-groups", "expertflow", "expertflow-offloaded"],
)
def test_outputs_identical_to_fcfs(tiny_checkpoint: Path, flags: dict[str, object]) -> None:
    reference, _ = greedy(tiny_checkpoint)
    tokens, llm = greedy(tiny_checkpoint, **flags)
    assert tokens == reference
    selector = llm.engine.scheduler.selector
    assert selector is not None
    if flags["token_scheduler"] == "expertflow":
        assert selector.stats.rounds > 0
        assert selector.stats.objective <= selector.stats.fcfs_objective


def test_no_sequence_waits_longer_than_the_bound(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worst = 0
    select = StepSelector.select

    def watched(self: StepSelector, seq_ids: list[int]) -> list[int]:
        nonlocal worst
        chosen = select(self, seq_ids)
        worst = max(worst, max(self.deferred.values(), default=0))
        return chosen

    monkeypatch.setattr(StepSelector, "select", watched)
    llm = LLM(
        model=str(mixtral_checkpoint),
        max_model_len=32,
        max_num_seqs=32,
        token_scheduler="expertflow",
        token_group_size=8,
        max_defer_steps=3,
    )
    prompts = [[1, 3 + i % 300, 7 + (i * 7) % 300] for i in range(256)]
    lengths = [2 + i % 7 for i in range(256)]
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        llm.engine.add_request(
            str(i), prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        )
    finished = 0
    while llm.engine.has_unfinished():
        finished += sum(out.finished for out in llm.engine.step())
    assert finished == 256
    assert 0 < worst <= 3


def test_group_size_must_allow_the_bound() -> None:
    with pytest.raises(ConfigError, match="max_defer_steps"):
        EngineConfig(max_num_seqs=64, token_group_size=4, max_defer_steps=3)
    assert EngineConfig(max_num_seqs=64, token_scheduler="expertflow").step_group_size == 32
    assert EngineConfig(max_num_seqs=64).step_group_size is None
