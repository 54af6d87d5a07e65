"""Qwen3-Next / Qwen3.5 beyond the comparison with transformers: the VL release's layout on disk,
the pool of linear-attention states, and what the per-sequence state changes in the engine (no
prefix caching, slots handed back, chunked prefill carrying the state across steps)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, AsyncLLM, ConfigError, EngineConfig, SamplingParams
from engine.hybrid_config import LinearAttentionConfig
from engine.linear_state import LinearBatch, LinearStates
from engine.model_config import ModelConfig
from tests.conftest import Preemptions, save_tiny_checkpoint, tiny_config

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = [1, *range(100, 139)]  # 40 tokens: several chunks of 8, more than two KV blocks
PROMPTS = [[1, 17, 99, 240, 5], [1, 300, 12, 44, 45, 46, 47, 48, 49, 50, 51], [1, 7], LONG]


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("qwen3_next", tmp_path_factory.mktemp("qwen3_next"))


def greedy(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


def edit_weights(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    """A copy of `src` with tensors added to its safetensors."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors") | extra
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def to_vl_release(src: Path, dst: Path, gate_first: bool = True) -> Path:
    """transformers' save of Qwen3.5's text model (per-expert keys), rewritten as the hub release
    stores it: the VL config wrapper, the text model under `model.language_model.`, each layer's
    experts fused ([E, 2I, H] gate rows first, [E, H, I]), a vision tower and MTP weights."""
    dst.mkdir()
    text = json.loads((src / "config.json").read_text())
    config = {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"depth": 1, "hidden_size": 8},
        "tie_word_embeddings": False,
    }
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(src / "model.safetensors")
    hub: dict[str, torch.Tensor] = {}
    for layer in range(text["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate, up, down = (
            [weights.pop(f"{prefix}.{e}.{part}.weight") for e in range(text["num_experts"])]
            for part in ("gate_proj", "up_proj", "down_proj")
        )
        halves = zip(gate, up, strict=True) if gate_first else zip(up, gate, strict=True)
        fused = f"model.language_model.layers.{layer}.mlp.experts"
        hub[f"{fused}.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in halves])
        hub[f"{fused}.down_proj"] = torch.stack(down)
    for key, tensor in weights.items():  # lm_head stays where it is
        hub[key.replace("model.", "model.language_model.", 1)] = tensor
    hub["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2, 2)
    hub["mtp.fc.weight"] = torch.randn(64, 128)
    save_file(hub, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    return dst


def test_qwen3_5_hub_release_layout_gives_the_same_outputs(tmp_path: Path) -> None:
    """The released folder (fused experts, renamed keys, vision and MTP weights beside) loads to
    the same model: greedy tokens of every prompt equal those of transformers' save. With the
    gate and up halves swapped they do not, so the fused experts are what the prompts exercise."""
    original = save_tiny_checkpoint("qwen3_5_moe", tmp_path / "text")
    release = to_vl_release(original, tmp_path / "release")
    expected = greedy(LLM(model=str(original), max_model_len=64), PROMPTS)
    llm = LLM(model=str(release), max_model_len=64)
    assert llm.engine.model_config.family == "qwen3_5_moe"
    assert greedy(llm, PROMPTS) == expected
    swapped = to_vl_release(original, tmp_path / "swapped", gate_first=False)
    outs = greedy(LLM(model=str(swapped), max_model_len=64), PROMPTS)
    assert sum(a != b for a, b in zip(outs, expected, strict=True)) >= 2


def test_qwen3_next_skips_mtp_weights_and_names_unknown_ones(
    next_checkpoint: Path, tmp_path: Path
) -> None:
    mtp = edit_weights(next_checkpoint, tmp_path / "mtp", {"mtp.fc.weight": torch.ones(64, 128)})
    expected = greedy(LLM(model=str(next_checkpoint), max_model_len=64), PROMPTS[:2])
    assert greedy(LLM(model=str(mtp), max_model_len=64), PROMPTS[:2]) == expected
    key = "model.layers.0.linear_attn.extra.weight"
    bad = edit_weights(next_checkpoint, tmp_path / "bad", {key: torch.ones(4)})
    with pytest.raises(ConfigError, match=rf"unexpected weight '{key}'"):
        LLM(model=str(bad), max_model_len=64)


def linear_states(num_slots: int) -> LinearStates:
    cfg = LinearAttentionConfig(
        layers=(0, 2),
        num_key_heads=1,
        num_value_heads=2,
        key_head_dim=4,
        value_head_dim=3,
        conv_kernel=3,
        hub_layout="split",
    )
    return LinearStates(cfg, num_slots, torch.float32, "cpu", num_snapshots=num_slots)


def slots(batch: LinearBatch) -> list[int]:
    decodes = [] if batch.decode_slots is None else batch.decode_slots.tolist()
    return decodes + [slot for _, slot in batch.chunks]


def test_state_slots_are_reused_and_zeroed_from_position_zero() -> None:
    """A slot freed by one sequence serves the next, and holds nothing of the last: a sequence
    computing from position 0 starts from zeros, one resuming keeps its state."""
    states = linear_states(2)
    [a, b] = slots(states.batch([10, 11], [0, 0], [3, 4]))
    assert states.num_free == 0
    states.release(10)
    states.release(10)  # a second release (abort after finish) is harmless
    assert states.num_free == 1
    for tensor in (*states.conv.values(), *states.recurrent.values()):
        tensor.fill_(1.0)
    assert slots(states.batch([12, 11], [0, 4], [2, 1])) == [b, a]  # the decode first
    for tensor in (*states.conv.values(), *states.recurrent.values()):
        assert tensor[a].eq(0).all() and tensor[b].eq(1).all()


def test_snapshots_resume_sequences_one_per_owner_least_recently_used_out() -> None:
    states = linear_states(2)  # two slots, two snapshots
    slot = slots(states.batch([1], [0], [4]))[0]
    for i, tensor in enumerate((*states.conv.values(), *states.recurrent.values())):
        tensor[slot].fill_(i + 1.0)
    states.keep(1, b"a")
    states.batch([1], [4], [1])  # the sequence goes on; its snapshot stays as it was
    for tensor in (*states.conv.values(), *states.recurrent.values()):
        tensor[slot].fill_(-1.0)
    states.resume(2, b"a")
    [resumed] = slots(states.batch([2], [4], [1]))  # resuming at 4: no reset
    for i, tensor in enumerate((*states.conv.values(), *states.recurrent.values())):
        assert tensor[resumed].eq(i + 1.0).all()
    states.keep(1, b"b")  # a sequence's newer snapshot replaces its older one
    assert states.has(b"b") and not states.has(b"a")
    states.release(1)  # done: its last snapshot stays for later sequences
    states.keep(2, b"c")
    states.batch([3], [0], [2])
    states.keep(3, b"d")  # the pool is full: the least recently used ("b") goes
    assert not states.has(b"b") and states.has(b"c") and states.has(b"d")
    states.keep(2, b"e")  # in place of its own "c", not of 3's "d"
    assert states.has(b"d") and states.has(b"e") and not states.has(b"c")


def test_state_pool_refuses_lost_states_and_too_many_sequences() -> None:
    states = linear_states(2)
    with pytest.raises(RuntimeError, match="resumes at 4 without its state"):
        states.batch([5], [4], [1])
    with pytest.raises(RuntimeError, match="more running sequences"):
        states.batch([1, 2, 3], [0, 0, 0], [2, 2, 2])


def test_state_batch_splits_decodes_from_chunks() -> None:
    """One-token runs (decodes, or a one-token prompt) step together; longer runs each get their
    rows of the step. Each sequence keeps its slot from step to step."""
    states = linear_states(4)
    first = states.batch([1, 2, 3, 4], [0, 0, 0, 0], [1, 5, 1, 3])
    assert first.decode_rows is not None and first.decode_rows.tolist() == [0, 6]
    assert [rows for rows, _ in first.chunks] == [slice(1, 6), slice(7, 10)]
    assert first.decode_slots is not None
    s1, s3 = first.decode_slots.tolist()
    (_, s2), (_, s4) = first.chunks
    assert len({s1, s2, s3, s4}) == 4
    second = states.batch([1, 2, 3, 4], [1, 5, 1, 3], [1, 1, 1, 1])
    assert second.chunks == [] and second.decode_rows is not None
    assert second.decode_rows.tolist() == [0, 1, 2, 3] and slots(second) == [s1, s2, s3, s4]
    assert states.batch([1], [2], [6]).decode_rows is None


def test_prefix_cache_resumes_only_where_a_state_was_kept(next_checkpoint: Path) -> None:
    """A cached prefix's KV blocks do not bring back the linear layers' state: a sequence resumes
    only after a block boundary where one was snapshot (here: none inside the prompt)."""
    llm = LLM(model=str(next_checkpoint), max_model_len=64)
    first, second = llm.generate([LONG], GREEDY) + llm.generate([LONG], GREEDY)
    assert first.num_cached_tokens == second.num_cached_tokens == 0
    assert first.token_ids == second.token_ids
    linear = llm.engine.model_config.linear_attention
    assert linear is not None and linear.layers == (0, 1, 2)
    assert [k.numel() == 0 for k in llm.engine.kv.k] == [True, True, True, False]


def test_chat_turn_resumes_from_the_previous_answers_last_boundary(
    next_checkpoint: Path,
) -> None:
    """The next turn (prompt + answer + new message) resumes from the state snapshot where the
    answer filled its last block, and says what an engine without prefix caching says."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    llm = LLM(model=str(next_checkpoint), max_model_len=128, max_num_seqs=2)  # 2 snapshots
    plain = LLM(model=str(next_checkpoint), max_model_len=128, enable_prefix_caching=False)
    answer = greedy(llm, [LONG], params)[0]  # 40 + 19 computed tokens: a boundary at 48
    # Another request meanwhile crosses three boundaries, but holds one snapshot at a time.
    greedy(llm, [[1, *range(200, 230)]], SamplingParams(max_tokens=40, ignore_eos=True))
    turn = LONG + answer + [5, 6, 7]
    [resumed] = llm.generate([turn], params)
    assert resumed.num_cached_tokens == 48
    assert resumed.token_ids == greedy(plain, [turn], params)[0]
    assert llm.engine.runner.states is not None
    assert llm.engine.runner.states.num_free == 2
    assert plain.engine.runner.states is not None  # no prefix caching: no snapshot memory
    assert plain.engine.runner.states.snap_recurrent[0].numel() == 0


def test_requests_sharing_a_system_prompt_resume_after_it_from_the_third(
    next_checkpoint: Path,
) -> None:
    """The first request leaves no state inside its prompt. The second finds the first's blocks
    of their shared 40-token system prompt (two full blocks), cannot resume after them, and ends
    a chunk where the prompts diverge (32), keeping a state there beside its own latest one; the
    third resumes after it. Every output is what an engine without prefix caching says."""
    system = [1, *range(100, 139)]
    prompts = [[*system, 200 + i, 210 + i, 220 + i] for i in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(model=str(next_checkpoint), max_model_len=128, max_num_seqs=2)
    plain = LLM(model=str(next_checkpoint), max_model_len=128, enable_prefix_caching=False)
    chunks: list[list[int]] = []
    schedule = llm.engine.scheduler.schedule

    def watched():  # noqa: ANN202
        batch = schedule()
        chunks.append(batch.num_new_tokens)
        return batch

    llm.engine.scheduler.schedule = watched  # type: ignore[method-assign]
    outs = [llm.generate([prompt], params)[0] for prompt in prompts]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 32]
    assert [c[0] for c in chunks if c and c[0] > 1] == [43, 32, 11, 11]
    assert [o.token_ids for o in outs] == greedy(plain, prompts, params)


def test_later_choices_resume_after_the_first_computed_their_prompt(
    next_checkpoint: Path,
) -> None:
    """n = 3: the first choice ends a chunk at the prompt's last full block (32 of 40 tokens) and
    keeps a state there; the other two wait for it, then compute only the last 8 tokens. Same
    choices as without prefix caching."""
    params = SamplingParams(n=3, max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM(model=str(next_checkpoint), max_model_len=128, max_num_seqs=4)
    plain = LLM(model=str(next_checkpoint), max_model_len=128, enable_prefix_caching=False)
    prefills: list[int] = []
    schedule = llm.engine.scheduler.schedule

    def watched():  # noqa: ANN202
        batch = schedule()
        prefills.extend(n for n in batch.num_new_tokens if n > 1)
        return batch

    llm.engine.scheduler.schedule = watched  # type: ignore[method-assign]
    [out] = llm.generate([LONG], params)
    assert prefills == [32, 8, 8, 8]
    [expected] = plain.generate([LONG], params)
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in expected.outputs]
    assert llm.engine.blocks.num_used == 0


def test_finished_and_aborted_sequences_hand_back_their_state(next_checkpoint: Path) -> None:
    llm = LLM(model=str(next_checkpoint), max_model_len=64, max_num_seqs=4)
    engine = llm.engine
    assert engine.runner.states is not None
    expected = greedy(llm, PROMPTS + PROMPTS[:2])  # six prompts through four slots
    assert engine.runner.states.num_free == 4 and engine.blocks.num_used == 0
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"abort-{i}", prompt, params)
    for _ in range(3):
        engine.step()
    assert engine.runner.states.num_free == 1
    for i in range(3):
        out = engine.abort(f"abort-{i}")
        assert out is not None and out.outputs[0].finish_reason == "abort"
    assert engine.runner.states.num_free == 4 and engine.blocks.num_used == 0
    assert greedy(llm, PROMPTS + PROMPTS[:2]) == expected  # reused slots start clean


def test_greedy_choices_each_compute_their_own_state(next_checkpoint: Path) -> None:
    llm = LLM(model=str(next_checkpoint), max_model_len=64)
    [expected] = greedy(llm, [LONG])
    params = SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True)
    [out] = llm.generate([LONG], params)
    assert [o.token_ids for o in out.outputs] == [expected, expected]
    llm.engine.add_request("both", LONG, params)  # no state to take from the first: no waiting
    llm.engine.step()
    assert [s.num_computed_tokens for s in llm.engine.requests["both"].seqs] == [40, 40]
    llm.engine.abort("both")
    assert llm.engine.runner.states.num_free == llm.engine.config.max_num_seqs


def test_chunked_prefill_carries_the_state_across_steps(next_checkpoint: Path) -> None:
    """A prompt in chunks of 8 equals it in one step; prompts of different lengths together
    (decodes beside chunks in one step) equal each alone."""
    whole = LLM(model=str(next_checkpoint), max_model_len=64)
    chunked = LLM(model=str(next_checkpoint), max_model_len=64, max_num_batched_tokens=8)
    alone = [greedy(whole, [p])[0] for p in PROMPTS]
    assert greedy(chunked, [LONG]) == [alone[-1]]
    states = chunked.engine.runner.states
    assert states is not None
    batches: list[LinearBatch] = []
    original = states.batch

    def record(*args: list[int]) -> LinearBatch:
        batches.append(original(*args))
        return batches[-1]

    states.batch = record  # type: ignore[method-assign]
    assert greedy(chunked, PROMPTS) == alone
    assert any(b.decode_rows is not None and b.chunks for b in batches)  # mixed steps ran


HYBRID = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_types": [*HYBRID, "full_attention"]}, "layer_types must name"),
        ({"layer_types": ["sliding_attention", *HYBRID[1:]]}, "layer_types must name"),
        ({"layer_types": ["linear_attention"] * 4}, "layer_types needs at least one full_att"),
        ({"linear_num_value_heads": 3}, "linear_num_value_heads must be a multiple"),
    ],
    ids=["length", "kind", "no-attention", "value-heads"],
)
@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_bad_hybrid_config_names_the_field(family: str, changes: dict, message: str) -> None:
    raw = {**tiny_config(family).to_dict(), **changes}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_async_streams_under_kv_pressure_with_aborts_keep_states_apart(
    next_checkpoint: Path,
) -> None:
    """The server's path: concurrent streams, too little KV for all (preemption recomputes from
    position 0), clients aborting mid-stream; the rest still equal the offline outputs."""
    prompts = [[1, *((7 * i + 5 * j) % 300 + 10 for j in range(3 + 4 * i))] for i in range(8)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = greedy(LLM(model=str(next_checkpoint), max_model_len=64), prompts, params)
    config = EngineConfig(model=str(next_checkpoint), max_model_len=64, kv_cache_blocks=6)
    engine = AsyncLLM(config, model_name="tiny")
    watched = Preemptions(engine)  # type: ignore[arg-type]  # it reads .engine.scheduler

    async def stream(i: int) -> list[int] | None:
        async for out in engine.generate(prompts[i], params, f"r{i}"):
            if i % 3 == 0 and not out.finished:
                await engine.abort(f"r{i}")
            if out.finished:
                return None if out.outputs[0].finish_reason == "abort" else out.outputs[0].token_ids
        return None

    async def main() -> list[list[int] | None]:
        return await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(8))), 60)

    try:
        results = asyncio.run(main())
        states = engine.engine.runner.states
        assert states is not None and states.num_free == engine.engine.config.max_num_seqs
        assert engine.stats()["kv_blocks_used"] == 0 and watched.count > 0
    finally:
        engine.shutdown()
    kept = [(r, e) for r, e in zip(results, expected, strict=True) if r is not None]
    assert len(kept) >= 5 and all(r == e for r, e in kept)
