"""engine/sampler.py, engine/detokenizer.py, engine/sampling.py through the offline LLM API: seeds,
top-k/top-p, stop strings and tokens, finish reasons, streamed text, n, logprobs, penalties,
logit bias, validation."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, RequestError, RequestOutput, SamplingParams, runner
from engine.sampler import apply_logit_bias, scored
from engine.sequence import Sequence

if TYPE_CHECKING:
    from tests.conftest import Preemptions

MAX_MODEL_LEN = 128
PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Mixture of experts",
    "import torch",
    "print(x)",
]
_ids = itertools.count()


@pytest.fixture(scope="module")
def llm(mixtral_checkpoint: Path) -> LLM:
    return LLM(model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN)


def encode(llm: LLM, prompt: str) -> list[int]:
    return llm.tokenizer.encode(prompt)


def run_batch(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> list[RequestOutput]:
    """Run requests with different parameters in one continuous batch; final outputs in order."""
    engine = llm.engine
    order = [f"batch-{next(_ids)}" for _ in requests]
    for request_id, (prompt_ids, params) in zip(order, requests, strict=True):
        engine.add_request(request_id, prompt_ids, params)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    return [final[r] for r in order]


def stream(llm: LLM, prompt_ids: list[int], params: SamplingParams) -> list[RequestOutput]:
    """Every output of one request, step by step, as a streaming client sees them."""
    engine = llm.engine
    request_id = f"stream-{next(_ids)}"
    engine.add_request(request_id, prompt_ids, params)
    outs: list[RequestOutput] = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == request_id]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs


def greedy(llm: LLM, prompt: str, max_tokens: int = 24) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate(prompt, params)[0].token_ids


# ---- seeds, top-k, top-p ------------------------------------------------------------------------
def test_same_seed_same_output_alone_and_batched_in_any_order(llm: LLM) -> None:
    ids = [encode(llm, p) for p in PROMPTS]
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
    alone = [run_batch(llm, [(p, seeded)])[0].outputs[0].token_ids for p in ids]
    # unseeded neighbours draw from the engine's generator in between: must not disturb the seeded
    noise = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=0.7, top_k=5, max_tokens=9, seed=99, ignore_eos=True)
    mixed = run_batch(
        llm,
        [(ids[2], noise), *[(p, seeded) for p in reversed(ids)], (ids[0], other), (ids[1], noise)],
    )
    batched = [o.outputs[0].token_ids for o in reversed(mixed[1:-2])]
    assert batched == alone
    assert llm.generate(PROMPTS, seeded)[3].token_ids == alone[3]

    reseeded = SamplingParams(temperature=1.0, max_tokens=16, seed=1235, ignore_eos=True)
    different = [o.token_ids for o in llm.generate(PROMPTS, reseeded)]
    assert all(a != b for a, b in zip(alone, different, strict=True))
    assert any(a != greedy(llm, p, 16) for a, p in zip(alone, PROMPTS, strict=True))


def test_top_k_1_tiny_top_p_min_p_1_and_tiny_temperatures_equal_greedy(llm: LLM) -> None:
    reference = [greedy(llm, p, 16) for p in PROMPTS]
    for params in (
        SamplingParams(temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=16, ignore_eos=True, seed=5),
        SamplingParams(temperature=1.5, min_p=1.0, max_tokens=16, ignore_eos=True, seed=7),
        SamplingParams(temperature=1e-45, max_tokens=16, ignore_eos=True),  # below 1e-5: greedy
        SamplingParams(temperature=5e-6, max_tokens=16, ignore_eos=True, seed=3),
    ):
        assert [o.token_ids for o in llm.generate(PROMPTS, params)] == reference


def test_top_k_and_top_p_sample_only_inside_their_sets(llm: LLM) -> None:
    # logprobs are the raw model's: the top-k / nucleus sets at temperature 1 can be rebuilt from them
    for params, allowed in (
        (SamplingParams(top_k=3, logprobs=3, max_tokens=24, seed=3, ignore_eos=True), None),
        (SamplingParams(top_p=0.1, logprobs=20, max_tokens=24, seed=3, ignore_eos=True), 0.1),
    ):
        chosen_ranks = set()
        for out in llm.generate(PROMPTS, params):
            for lp in out.outputs[0].logprobs or []:
                top_ids = [i for i, _, _ in lp.top]
                if allowed is not None:  # keep tokens while the mass before them is below top_p
                    mass = itertools.accumulate(math.exp(v) for _, _, v in lp.top)
                    top_ids = [
                        i
                        for i, before in zip(top_ids, [0.0, *mass], strict=False)
                        if before < allowed
                    ]
                    assert len(top_ids) < len(lp.top), "nucleus not inside the top 20"
                assert lp.token_id in top_ids
                chosen_ranks.add(top_ids.index(lp.token_id))
        assert len(chosen_ranks) > 1, "sampling never left the argmax"


def test_min_p_samples_nothing_less_likely_than_its_share_of_the_best(llm: LLM) -> None:
    params = SamplingParams(min_p=0.3, logprobs=1, max_tokens=24, seed=3, ignore_eos=True)
    left_argmax = False
    for out in llm.generate(PROMPTS, params):
        for lp in out.outputs[0].logprobs or []:
            best_id, _, best = lp.top[0]
            assert lp.logprob >= math.log(params.min_p) + best - 1e-5
            left_argmax |= lp.token_id != best_id
    assert left_argmax, "sampling never left the argmax"


# ---- stop strings, stop tokens, EOS, length, streamed text ---------------------------------------
def spanning_stop_string(llm: LLM, token_ids: list[int]) -> tuple[str, int]:
    """A 2-char printable stop string whose first occurrence spans tokens k-1 and k; returns it, k."""
    decode = llm.engine.detokenizer.decode
    prefixes = [decode(token_ids[:i]) for i in range(len(token_ids) + 1)]
    text = prefixes[-1]
    for k in range(1, len(token_ids)):
        before, after = prefixes[k], prefixes[k + 1]
        if not after.startswith(before) or len(before) <= len(prefixes[k - 1]):
            continue
        stop = after[len(before) - 1 : len(before) + 1]
        printable = len(stop) == 2 and stop.isascii() and stop.isprintable()
        if printable and text.find(stop) == len(before) - 1:
            return stop, k
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", ["import torch", "print(x)", "def add(a, b):"])
def test_stop_string_spanning_two_tokens(llm: LLM, prompt: str) -> None:
    reference = greedy(llm, prompt)
    full = llm.engine.detokenizer.decode(reference)
    stop, k = spanning_stop_string(llm, reference)
    at = full.find(stop)
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop, "never-generated"])
    outs = stream(llm, encode(llm, prompt), params)
    final = outs[-1].outputs[0]
    assert final.text == full[:at] and stop not in final.text
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.token_ids == reference[: k + 1]  # stopped on the token that completed the string
    for out in outs:  # the streamed (held-back) text never shows any part of the stop string
        assert final.text.startswith(out.outputs[0].text)

    kept = llm.generate(
        prompt, SamplingParams(**{**vars(params), "include_stop_str_in_output": True})
    )
    assert kept[0].text == full[: at + len(stop)]
    assert kept[0].outputs[0].stop_reason == stop and kept[0].token_ids == reference[: k + 1]


def test_streamed_text_is_always_a_prefix_of_the_final_text(llm: LLM) -> None:
    for prompt, params in itertools.product(
        PROMPTS,
        (
            SamplingParams(temperature=1.0, seed=11, max_tokens=32, stop=["els", " m", "zzz"]),
            SamplingParams(temperature=1.0, seed=12, max_tokens=32, ignore_eos=True),
        ),
    ):
        outs = stream(llm, encode(llm, prompt), params)
        final = outs[-1].outputs[0]
        texts = [o.outputs[0].text for o in outs]
        for earlier, later in itertools.pairwise(texts):
            assert later.startswith(earlier)
        assert final.finish_reason in ("stop", "length")
        if final.finish_reason == "length":
            assert len(final.token_ids) == 32 and final.stop_reason is None


def test_stop_token_ids_finish_with_stop(llm: LLM) -> None:
    prompt = "def add(a, b):"
    reference = greedy(llm, prompt)
    stop_token = reference[5]
    first = reference.index(stop_token)
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token])
    out = llm.generate(prompt, params)[0].outputs[0]
    assert out.token_ids == reference[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token
    decode = llm.engine.detokenizer.decode
    assert out.text == decode(reference[:first])  # as vLLM: the stop token's text is not shown
    params.include_stop_str_in_output = True
    assert llm.generate(prompt, params)[0].text == decode(reference[: first + 1])


def test_eos_finishes_with_stop_unless_ignored(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    # A checkpoint whose config lists a second EOS id (like Llama 3's) that greedy decoding emits.
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN)
    prompt = "print(x)"
    reference = greedy(llm, prompt)
    eos = reference[3]
    first = reference.index(eos)
    folder = shutil.copytree(mixtral_checkpoint, tmp_path / "multi-eos")
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], eos]
    (folder / "config.json").write_text(json.dumps(config))
    llm = LLM(model=str(folder), max_model_len=MAX_MODEL_LEN)

    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert out.token_ids == reference[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == llm.engine.detokenizer.decode(reference[:first])

    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert out.token_ids == reference and out.outputs[0].finish_reason == "length"


def test_max_tokens_and_context_end_finish_with_length(llm: LLM) -> None:
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert len(out[0].token_ids) == 7 and out[0].outputs[0].finish_reason == "length"
    prompt_ids = encode(llm, PROMPTS[0])
    unbounded = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    out = llm.generate([prompt_ids], unbounded)
    assert len(prompt_ids) + len(out[0].token_ids) == MAX_MODEL_LEN
    assert out[0].outputs[0].finish_reason == "length"


# ---- n ------------------------------------------------------------------------------------------
def test_n_choices_are_indexed_distinct_and_reproducible(llm: LLM) -> None:
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = llm.generate(PROMPTS[:2], params)
    again = llm.generate(PROMPTS[:2], params)
    for a, b in zip(first, again, strict=True):
        assert [c.index for c in a.outputs] == [0, 1]
        assert a.outputs[0].token_ids != a.outputs[1].token_ids
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in a.outputs)


# ---- logprobs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_match_transformers(
    llm: LLM, mixtral_checkpoint: Path, temperature: float
) -> None:
    hf = AutoModelForCausalLM.from_pretrained(mixtral_checkpoint, dtype=torch.float32).eval()
    k = 5
    params = SamplingParams(
        temperature=temperature, logprobs=k, max_tokens=10, seed=21, ignore_eos=True
    )
    for out in llm.generate(PROMPTS[:3], params):
        prompt_ids, choice = out.prompt_token_ids, out.outputs[0]
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt_ids + choice.token_ids])).logits[0]  # [T, V]
        ref = torch.log_softmax(
            logits[len(prompt_ids) - 1 : -1], dim=-1
        )  # [N, V]: per output token
        assert choice.logprobs is not None and len(choice.logprobs) == len(choice.token_ids)
        for pos, (token, lp) in enumerate(zip(choice.token_ids, choice.logprobs, strict=True)):
            assert lp.token_id == token
            assert lp.token == llm.tokenizer.decode([token], skip_special_tokens=False)
            assert lp.logprob == pytest.approx(ref[pos, token].item(), abs=1e-4)
            top_values = [v for _, _, v in lp.top]
            assert len(lp.top) == k and top_values == sorted(top_values, reverse=True)
            expected = torch.topk(ref[pos], k)
            assert [i for i, _, _ in lp.top] == expected.indices.tolist()
            torch.testing.assert_close(torch.tensor(top_values), expected.values, atol=1e-4, rtol=0)
            if temperature == 0.0:
                assert lp.top[0][0] == token and lp.top[0][2] == lp.logprob


@pytest.mark.parametrize(
    "flags",
    [{}, {"max_num_batched_tokens": 8, "kv_cache_blocks": 3}],
    ids=["whole-prompt", "chunked-and-preempted"],
)
def test_prompt_logprobs_match_transformers(
    mixtral_checkpoint: Path,
    flags: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    preemptions: Callable[[LLM], Preemptions],
) -> None:
    # 3 blocks of 16 tokens hold one of these sequences at a time: prompts are prefilled 8 tokens
    # a chunk, and a sequence preempted while decoding rescores its prompt when recomputed; a
    # chunk's positions are scored 3 at a time.
    monkeypatch.setattr(runner, "PROMPT_SCORE_ROWS", 3)
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=48, **flags)
    watched = preemptions(llm)
    prompts = [encode(llm, p) * 3 for p in PROMPTS[:3]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=3)
    hf = AutoModelForCausalLM.from_pretrained(mixtral_checkpoint, dtype=torch.float32).eval()
    for out in llm.generate(prompts, params):
        ids, entries = out.prompt_token_ids, out.prompt_logprobs
        assert entries is not None and len(entries) == len(ids) and entries[0] is None
        with torch.inference_mode():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], dim=-1)  # [P-1, V]
        for position, entry in enumerate(entries[1:], start=1):
            assert entry is not None and entry.token_id == ids[position]
            assert entry.logprob == pytest.approx(ref[position - 1, ids[position]].item(), abs=1e-4)
            assert [i for i, _, _ in entry.top] == torch.topk(ref[position - 1], 3).indices.tolist()
    assert (watched.count > 0) == bool(flags)
    assert llm.engine.blocks.num_used == 0


def test_prompt_logprobs_off_by_default_and_once_for_n_choices(llm: LLM) -> None:
    one = llm.generate([[7]], SamplingParams(max_tokens=2, prompt_logprobs=2))[0]
    assert one.prompt_logprobs == [None]  # nothing to score in a one-token prompt
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=2))[0].prompt_logprobs is None
    params = SamplingParams(n=3, max_tokens=2, seed=1, prompt_logprobs=0)
    out = llm.generate(PROMPTS[0], params)[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(e is not None and e.top == [] for e in out.prompt_logprobs[1:])


def test_logprobs_off_zero_and_max(llm: LLM) -> None:
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert out.logprobs is None
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=0)
    assert all(lp.top == [] for lp in llm.generate(PROMPTS[0], params)[0].outputs[0].logprobs)
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=20)
    tops = [lp.top for lp in llm.generate(PROMPTS[0], params)[0].outputs[0].logprobs]
    assert all(len(t) == 20 and len({i for i, _, _ in t}) == 20 for t in tops)


# ---- penalties ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "penalties", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}], ids=["presence", "freq"]
)
def test_penalties_change_greedy_output_only_when_set(
    llm: LLM, penalties: dict[str, float]
) -> None:
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = [o.token_ids for o in llm.generate(PROMPTS, base)]
    zero = SamplingParams(**{**vars(base), **dict.fromkeys(penalties, 0.0)})
    assert [o.token_ids for o in llm.generate(PROMPTS, zero)] == reference
    penalised = [
        o.token_ids for o in llm.generate(PROMPTS, SamplingParams(**{**vars(base), **penalties}))
    ]
    # the prompt is not penalised (OpenAI semantics): the first token cannot change
    assert [p[0] for p in penalised] == [r[0] for r in reference]
    assert all(p != r for p, r in zip(penalised, reference, strict=True))
    # the greedy outputs repeat tokens; a large penalty makes them far less repetitive
    assert sum(len(set(p)) for p in penalised) > sum(len(set(r)) for r in reference)


# ---- logit bias -----------------------------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens_in_a_mixed_batch(llm: LLM) -> None:
    base = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompt_ids = encode(llm, PROMPTS[0])
    plain = llm.generate([prompt_ids], base)[0].outputs[0]
    forced_id = 42 if plain.token_ids[0] != 42 else 43
    forced = SamplingParams(**{**vars(base), "logit_bias": {forced_id: 100.0}})
    banned = SamplingParams(**{**vars(base), "logit_bias": {t: -100.0 for t in plain.token_ids}})
    outs = run_batch(llm, [(prompt_ids, forced), (prompt_ids, base), (prompt_ids, banned)])
    forced_out, plain_again, banned_out = (o.outputs[0] for o in outs)
    assert forced_out.token_ids == [forced_id] * 6
    assert plain_again.token_ids == plain.token_ids  # a neighbour's bias never leaks into a row
    assert not set(banned_out.token_ids) & set(plain.token_ids)
    # logprobs stay the model's own: the first forced token keeps its unbiased log-probability
    assert forced_out.logprobs is not None and plain.logprobs is not None
    assert forced_out.logprobs[0].logprob < plain.logprobs[0].logprob


def test_a_long_bias_is_built_once_and_repeated_stop_ids_count_once(llm: LLM) -> None:
    """A request's logit_bias may name most of the vocabulary and its stop ids may repeat: both
    are turned into tensors and a set once, not each step, which slowed every request."""
    seq = Sequence("r", 0, [1, 2], 1, SamplingParams(logit_bias={3: 5.0, 7: -5.0}), 4, None)
    first = apply_logit_bias(torch.zeros(1, 10), [seq])
    made = seq.logit_bias
    assert apply_logit_bias(torch.zeros(1, 10), [seq]).tolist() == first.tolist()
    assert made is not None and seq.logit_bias is made
    assert first[0, 3] == 5.0 and first[0, 7] == -5.0
    forced = 42
    params = SamplingParams(
        temperature=0.0, max_tokens=5, logit_bias={forced: 100.0}, stop_token_ids=[forced] * 10**5
    )
    (out,) = llm.generate([encode(llm, PROMPTS[0])], params)[0].outputs
    assert out.token_ids == [forced] and out.finish_reason == "stop" and out.stop_reason == forced


def test_logit_bias_token_outside_the_vocabulary_is_refused(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(RequestError) as info:
        llm.generate(PROMPTS[0], SamplingParams(logit_bias={vocab: 1.0}))
    assert info.value.param == "logit_bias" and str(vocab) in str(info.value)
    assert not llm.engine.has_unfinished()


def test_repetition_penalty_changes_greedy_output_only_when_set(llm: LLM) -> None:
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = [o.token_ids for o in llm.generate(PROMPTS, base)]
    same = SamplingParams(**{**vars(base), "repetition_penalty": 1.0})
    assert [o.token_ids for o in llm.generate(PROMPTS, same)] == reference
    strong = SamplingParams(**{**vars(base), "repetition_penalty": 2.0})
    penalised = [o.token_ids for o in llm.generate(PROMPTS, strong)]
    assert penalised != reference
    assert sum(len(set(p)) for p in penalised) > sum(len(set(r)) for r in reference)


def test_min_tokens_holds_back_eos_stop_tokens_and_stop_strings(llm: LLM) -> None:
    eos = llm.engine.model_config.eos_token_ids[0]
    forced_eos = {eos: 100.0}  # EOS would be drawn at once
    params = SamplingParams(temperature=0.0, max_tokens=12, logit_bias=forced_eos, min_tokens=5)
    out = llm.generate(PROMPTS[0], params)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 6 and out.token_ids[-1] == eos
    assert eos not in out.token_ids[:5]
    token = 42
    params = SamplingParams(
        temperature=0.0, max_tokens=12, logit_bias={token: 100.0}, stop_token_ids=[token]
    )
    assert len(llm.generate(PROMPTS[0], params)[0].token_ids) == 1
    params = SamplingParams(**{**vars(params), "min_tokens": 3})  # token still forced
    held = llm.generate(PROMPTS[0], params)[0].outputs[0]
    assert held.finish_reason == "stop" and held.token_ids[3] == token
    assert len(held.token_ids) == 4 and token not in held.token_ids[:3]
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    text = llm.generate(PROMPTS[1], free)[0].text
    stop = text[:2]  # a stop string the free text ends within its first tokens
    params = SamplingParams(**{**vars(free), "stop": [stop], "min_tokens": 6})
    late = llm.generate(PROMPTS[1], params)[0].outputs[0]
    # the early stop string is let pass, not acted on late: the text runs on as without it
    assert stop not in text[2:], "pick a stop string that occurs only at the start"
    assert late.finish_reason == "length" and late.text == text


# ---- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("n", 0),
        ("n", 129),
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("logprobs", 21),
        ("logprobs", -1),
        ("prompt_logprobs", 21),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("min_tokens", -1),
        ("stop", [""]),
        ("logit_bias", {5: 100.5}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"5": 1.0}),
    ],
)
def test_out_of_range_parameters_raise_request_error(param: str, value: object) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**{param: value})
    assert info.value.param == param and param in str(info.value)


def test_boundary_parameters_are_accepted() -> None:
    SamplingParams(n=128, temperature=2.0, top_p=1.0, top_k=-1, logprobs=20, max_tokens=1)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, stop="one string")
    SamplingParams(logit_bias={0: -100.0, 7: 100.0})
    assert SamplingParams(stop="x").stop == ["x"]


def test_offline_completions_stop_where_the_context_ends(llm: LLM) -> None:
    """As in vLLM's LLM: a completion longer than the context has room for is cut (the server
    refuses it with OpenAI's error instead: tests/engine/test_async_llm.py); a prompt that fills
    the context is refused."""
    prompt_ids = list(range(10, 110))  # 100 tokens
    (out,) = llm.generate([prompt_ids], SamplingParams(max_tokens=40, temperature=0.0))
    assert len(out.token_ids) == MAX_MODEL_LEN - 100 and out.outputs[0].finish_reason == "length"
    with pytest.raises(RequestError) as info:
        llm.generate([list(range(10, 10 + MAX_MODEL_LEN))], SamplingParams(max_tokens=None))
    assert str(MAX_MODEL_LEN) in str(info.value) and info.value.code == "context_length_exceeded"
    # the engine keeps serving, and the refused request left nothing behind
    assert not llm.engine.has_unfinished() and llm.engine.stats()["kv_blocks_used"] == 0


def test_a_refused_prompt_in_a_batch_leaves_nothing_queued(mixtral_checkpoint: Path) -> None:
    llm = LLM(model=str(mixtral_checkpoint), max_model_len=MAX_MODEL_LEN)
    ok, too_long = list(range(10, 20)), list(range(10, 10 + MAX_MODEL_LEN))  # fills the context
    with pytest.raises(RequestError):
        llm.generate([ok, too_long], SamplingParams(max_tokens=40))
    assert not llm.engine.has_unfinished()
    assert len(llm.generate([ok], SamplingParams(max_tokens=4))[0].token_ids) == 4


def test_generate_takes_one_sampling_params_per_prompt(llm: LLM) -> None:
    lengths = [3, 9, 1, 6, 12]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(PROMPTS, params)
    assert [len(o.token_ids) for o in outs] == lengths
    assert [o.token_ids for o in outs] == [
        greedy(llm, p, n) for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    with pytest.raises(ValueError, match="2 sampling params for 5 prompts"):
        llm.generate(PROMPTS, params[:2])
    assert not llm.engine.has_unfinished()


def test_scores_rank_each_token_in_the_vocabulary() -> None:
    """A token's rank is how many tokens are at least as likely (vLLM's rank: ties take the
    worst), the top k best first."""
    logits = torch.tensor([[0.5, 3.0, 1.0, 2.0], [4.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    [(lp0, rank0, top0), (lp1, rank1, top1), (_, tied, _)] = scored(logits, [2, 0, 0], 2)
    assert (rank0, rank1, tied) == (3, 1, 2)
    assert [i for i, _ in top0] == [1, 3] and [i for i, _ in top1] == [0, 3]
    assert lp0 == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())
