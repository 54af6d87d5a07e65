"""`LLM.generate`, vLLM's offline API: what a call leaves in the engine when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.llm_engine import EngineStepError

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 5, 6], [1, 7, 8], [1, 9, 10], [1, 11, 12]]


def test_a_failed_step_leaves_no_request_behind(
    mixtral_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step fails while some prompts still wait (two run at a time): the call raises, and the
    waiting ones go too, so the next call neither runs them nor trips on their outputs."""
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=32, max_num_seqs=2)
    expected = [o.token_ids for o in llm.generate(PROMPTS[:1], GREEDY)]
    execute, calls = llm.engine.runner.execute, []

    def failing_second(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return execute(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "execute", failing_second)
    with pytest.raises(EngineStepError):
        llm.generate(PROMPTS, GREEDY)
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0
    assert [o.token_ids for o in llm.generate(PROMPTS[:1], GREEDY)] == expected


def test_prompts_as_vllm_dicts(mixtral_checkpoint: Path) -> None:
    """vLLM's TextPrompt / TokensPrompt dicts and its `sampling_params=` keyword work as the plain
    forms do; a dict with both or neither key, or another key, is refused before anything runs."""
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=32)
    text = llm.tokenizer.decode(PROMPTS[1])
    expected = [o.token_ids for o in llm.generate([PROMPTS[0], text], GREEDY)]
    dicts = [{"prompt_token_ids": PROMPTS[0]}, {"prompt": text}]
    assert [o.token_ids for o in llm.generate(dicts, sampling_params=GREEDY)] == expected
    assert llm.generate(dicts[0], GREEDY)[0].token_ids == expected[0]
    for bad in ({}, {"prompt": text, "prompt_token_ids": PROMPTS[0]}, {"prompt": text, "x": 1}):
        with pytest.raises(ValueError, match="exactly one of"):
            llm.generate([dicts[0], bad], GREEDY)
    assert not llm.engine.has_unfinished() and llm.engine.blocks.num_used == 0
