"""Local attention layers' own KV pool (scheduler/block_pools.py): Llama 4's chunked layers and
gpt-oss's sliding ones hold only the blocks their window reaches, so a pool smaller than one
context serves it, with transformers' outputs; prefixes still resume from the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.offload.predict.trace import trace_sequences
from scheduler.block_pools import WindowedBlocks
from tests.conftest import save_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, *range(40, 76)], [1, *range(100, 121)]]  # 37 and 22 tokens


def small_pool(path: Path, max_num_seqs: int = 2, **flags: object) -> LLM:
    """Blocks of 4 tokens, two sequences, 8-token steps: the local pool is one 128-token context
    (32 blocks, its least), while each sequence's window needs a few."""
    return LLM(
        model=str(path),
        max_model_len=128,
        block_size=4,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=8,
        **flags,
    )


@pytest.mark.parametrize("family", ["llama4", "gpt_oss"])
def test_local_layers_hold_only_their_window_and_give_transformers_tokens(
    family: str, tmp_path: Path
) -> None:
    path = save_tiny_checkpoint(family, tmp_path)
    llm = small_pool(path)
    blocks = llm.engine.blocks
    assert isinstance(blocks, WindowedBlocks) and blocks.local.num_blocks == 128 // 4
    layer = llm.engine.model_config.local_layers[0]
    assert llm.engine.kv.k[layer].shape[0] == blocks.local.num_blocks * 4
    window = llm.engine.model_config.local_attention
    assert window is not None
    peaks = {"full": 0, "local": 0}
    schedule = llm.engine.scheduler.schedule

    def watched():  # noqa: ANN202
        batch = schedule()
        peaks["full"] = max(peaks["full"], blocks.full.num_used)
        peaks["local"] = max(peaks["local"], blocks.local.num_used)
        return batch

    llm.engine.scheduler.schedule = watched  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    # each sequence's window and the blocks of a step's new tokens, while the full layers hold
    # whole contexts (77 and 62 tokens)
    assert peaks["local"] <= 2 * (-(-window.size // 4) + 1) + 2 < peaks["full"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
        assert out.token_ids == ref[0, len(prompt) :].tolist()
    assert blocks.num_used == 0


@pytest.mark.parametrize("family", ["llama4", "gpt_oss"])
def test_a_chat_turn_resumes_with_its_window_still_cached(family: str, tmp_path: Path) -> None:
    """The next turn takes the full layers' blocks of the whole previous conversation and the
    local layers' blocks of the window before its first new token; its answer is the one an
    engine without prefix caching gives."""
    path = save_tiny_checkpoint(family, tmp_path)
    llm, plain = small_pool(path), small_pool(path, enable_prefix_caching=False)
    [first] = llm.generate([PROMPTS[0]], GREEDY)
    turn = PROMPTS[0] + first.token_ids + [5, 6, 7]
    [resumed] = llm.generate([turn], GREEDY)
    assert resumed.num_cached_tokens == (len(turn) - 1) // 4 * 4  # every full block
    [expected] = plain.generate([turn], GREEDY)
    assert resumed.token_ids == expected.token_ids
    assert llm.engine.blocks.num_used == 0


def test_later_choices_share_the_first_ones_window(tmp_path: Path) -> None:
    """n = 3: the later choices take the prompt's blocks from the first, in both pools."""
    path = save_tiny_checkpoint("gpt_oss", tmp_path)
    llm, plain = small_pool(path, max_num_seqs=3), small_pool(path, enable_prefix_caching=False)
    params = SamplingParams(n=3, max_tokens=8, temperature=0.0, ignore_eos=True)
    [out] = llm.generate([PROMPTS[0]], params)
    [expected] = plain.generate([PROMPTS[0]], params)
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in expected.outputs]
    assert llm.engine.blocks.num_used == 0


def test_tracing_prefills_a_whole_context_through_the_local_pool(tmp_path: Path) -> None:
    """Tracing prefills each sequence at once: the local pool holds one whole context."""
    llm = small_pool(save_tiny_checkpoint("llama4", tmp_path))
    sequence = [1, *range(10, 109)]  # 100 tokens, longer than the windows and the step budget
    traces = trace_sequences(llm, [sequence], ["doc"])
    assert len(traces) == len(sequence) and llm.engine.blocks.num_used == 0


@pytest.mark.parametrize("family", ["llama4", "gpt_oss"])
def test_later_choices_waiting_for_a_seat_still_resume_after_the_prompt(
    family: str, tmp_path: Path
) -> None:
    """Two seats, four choices: the last two start only once one of the first two finishes, 60
    tokens past the prompt, by when their local window has long handed the prompt's blocks back.
    The prompt's blocks stay pinned for them, so each resumes after the prompt's full blocks;
    the pins go with the request, finished or aborted."""
    path = save_tiny_checkpoint(family, tmp_path)
    prompt = [1, *range(40, 81)]  # 42 tokens: 40 in full blocks of 4
    params = SamplingParams(n=4, max_tokens=60, temperature=0.8, seed=3, ignore_eos=True)
    llm, plain = small_pool(path), small_pool(path, enable_prefix_caching=False)
    engine = llm.engine
    engine.add_request("r", prompt, params)
    choices = engine.requests["r"].seqs
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [s.num_cached_tokens for s in choices] == [0, 40, 40, 40]
    assert engine.blocks.num_used == 0
    [expected] = plain.generate([prompt], params)
    assert [c.token_ids for c in outputs[-1].outputs] == [c.token_ids for c in expected.outputs]
    engine.add_request("aborted", prompt, params)
    for _ in range(20):  # the first two choices decode, the last two wait on pinned blocks
        engine.step()
    assert engine.scheduler._pins and engine.blocks.num_used > 0
    engine.abort("aborted")
    assert engine.blocks.num_used == 0 and not engine.scheduler._pins


def test_pins_give_way_when_memory_runs_short(tmp_path: Path) -> None:
    """A first choice preempted while its later choices wait drops its pin, and nothing stays
    pinned while nothing runs: the queue drains (a pin held through that once starved it), with
    the outputs of an engine without prefix caching. Linear-attention models take no pins."""
    path = save_tiny_checkpoint("mixtral", tmp_path / "mixtral")
    flags = dict(max_model_len=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=4)
    llm = LLM(model=str(path), kv_cache_blocks=16, **flags)
    plain = LLM(model=str(path), kv_cache_blocks=16, enable_prefix_caching=False, **flags)
    long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    pair = SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[1, *range(100, 113)], [1, *range(200, 228)]]
    engine, outputs = llm.engine, {}
    engine.add_request("long", prompts[0], long)
    engine.add_request("pair", prompts[1], pair)
    for _ in range(500):
        if not engine.has_unfinished():
            break
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert not engine.has_unfinished() and engine.blocks.num_used == 0
    expected = plain.generate(prompts, [long, pair])
    for request_id, want in zip(("long", "pair"), expected, strict=True):
        got = [c.token_ids for c in outputs[request_id].outputs]
        assert got == [c.token_ids for c in want.outputs]
    hybrid = LLM(model=str(save_tiny_checkpoint("qwen3_next", tmp_path / "next")), **flags)
    hybrid.engine.add_request("n", prompts[1], SamplingParams(n=3, max_tokens=20))
    for _ in range(30):
        hybrid.engine.step()
        assert not hybrid.engine.scheduler._pins
