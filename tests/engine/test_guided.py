"""Structured outputs (engine/guided.py): JSON that matches its schema, greedy or sampled, next to
free-text requests in one batch, and through preemption."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from engine import LLM, GuidedDecoding, RequestError, SamplingParams

if TYPE_CHECKING:
    from tests.conftest import Preemptions

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["yes", "no", "maybe"]},
        "ok": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["label", "ok", "note"],
    "additionalProperties": False,
}
GUIDED = GuidedDecoding(json.dumps(SCHEMA))
PROMPTS = ["The quick brown fox", "def add(a, b):", "Mixture of experts", "import torch"]


def assert_matches_schema(text: str) -> None:
    # xgrammar (as in vLLM) lets a string hold raw control characters, which strict JSON escapes
    value = json.loads(text, strict=False)
    assert set(value) == {"label", "ok", "note"}, value
    assert value["label"] in ("yes", "no", "maybe") and isinstance(value["ok"], bool)
    assert isinstance(value["note"], str) and len(value["note"]) <= 8


@pytest.fixture(scope="module")
def llm(mixtral_checkpoint: Path) -> LLM:
    return LLM(model=str(mixtral_checkpoint), max_model_len=128)


def test_schema_holds_greedy_and_sampled_next_to_free_text(llm: LLM) -> None:
    free = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = llm.generate(PROMPTS[2], free)[0].token_ids
    params = [
        SamplingParams(max_tokens=60, temperature=0.0, guided=GUIDED),
        SamplingParams(max_tokens=60, temperature=1.0, seed=1, n=3, guided=GUIDED),
        free,
    ]
    greedy, sampled, text = llm.generate(PROMPTS[:3], params)
    for choice in greedy.outputs + sampled.outputs:
        assert choice.finish_reason == "stop", choice.text
        assert_matches_schema(choice.text)
    assert len({c.text for c in sampled.outputs}) > 1  # sampling still samples, inside the grammar
    assert text.token_ids == alone  # a neighbour's grammar never masks another row


def test_the_grammar_ends_the_text_with_ignore_eos_and_keeps_it_valid_under_bias(llm: LLM) -> None:
    # ignore_eos would run to max_tokens, but a complete grammar allows nothing more; a bias
    # toward '"yes"'-less text (banning the letter y) only narrows what the grammar allows.
    y = llm.tokenizer.encode("y", add_special_tokens=False)
    params = SamplingParams(
        max_tokens=60,
        temperature=0.0,
        ignore_eos=True,
        guided=GUIDED,
        logit_bias=dict.fromkeys(y, -100.0),
    )
    choice = llm.generate(PROMPTS[3], params)[0].outputs[0]
    assert choice.finish_reason == "stop" and len(choice.token_ids) < 60
    assert_matches_schema(choice.text)
    assert json.loads(choice.text, strict=False)["label"] != "yes"


def test_a_grammar_can_start_after_a_marker(llm: LLM) -> None:
    """`start_after` (a thinking model's "</think>"): the text runs free, exactly as without a
    grammar, up to the marker's first appearance, and follows the grammar after it; a marker that
    never comes leaves it free. A bias makes the free text "eee...", so the marker "ee" comes
    after two tokens."""
    [e] = llm.engine.tokenizer.encode("e", add_special_tokens=False)
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logit_bias={e: 50.0})
    [alone] = llm.generate(PROMPTS[1], free)
    assert alone.outputs[0].text.startswith("ee")
    later = GuidedDecoding(json.dumps(SCHEMA), start_after="ee")
    guided = dataclasses.replace(free, max_tokens=60, ignore_eos=False, guided=later)
    [out] = llm.generate(PROMPTS[1], guided)
    assert out.outputs[0].text.startswith("ee") and out.outputs[0].finish_reason == "stop"
    assert_matches_schema(out.outputs[0].text.removeprefix("ee"))
    never = dataclasses.replace(free, guided=dataclasses.replace(later, start_after="\x00never"))
    assert llm.generate(PROMPTS[1], never)[0].outputs[0].token_ids == alone.outputs[0].token_ids


def test_an_opener_as_first_token_defers_the_grammar(llm: LLM) -> None:
    """`opener` (a model that writes "<think>" itself): an output that opens with that token runs
    free up to `start_after`, then follows the grammar; one that does not is exactly the plain
    grammar's. Here "e" stands for "<think>" and "ee" for "</think>": JSON cannot start with "e",
    so a bias toward it shows the opener is let through."""
    [e] = llm.engine.tokenizer.encode("e", add_special_tokens=False)
    optional = GuidedDecoding(json.dumps(SCHEMA), start_after="ee", opener="e")
    biased = SamplingParams(max_tokens=60, temperature=0.0, logit_bias={e: 50.0}, guided=optional)
    out = llm.generate(PROMPTS[1], biased)[0].outputs[0]
    assert out.text.startswith("ee") and out.finish_reason == "stop"
    assert_matches_schema(out.text.removeprefix("ee"))
    # banned, the opener is never taken (the same bias in both runs)
    plain = SamplingParams(max_tokens=60, temperature=0.0, logit_bias={e: -100.0}, guided=GUIDED)
    unopened = dataclasses.replace(plain, guided=optional)
    multi_token = dataclasses.replace(optional, opener="<think>")  # no one token: no opener
    expected = llm.generate(PROMPTS, plain)
    for params in (unopened, dataclasses.replace(plain, guided=multi_token)):
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == [
            o.outputs[0].token_ids for o in expected
        ]
    no_bias = dataclasses.replace(biased, guided=multi_token)
    assert_matches_schema(llm.generate(PROMPTS[1], no_bias)[0].outputs[0].text)


def test_text_past_the_marker_in_its_token_is_the_grammars_first(llm: LLM) -> None:
    """A token may carry the marker and more ("</think>{"): the rest is fed to the grammar, so the
    JSON that follows continues it instead of starting another value."""
    guide = llm.engine.grammars.guide(GuidedDecoding(json.dumps(SCHEMA), start_after="</think>"))
    guide.watch('hmm</think>\n{"label', new_from=3)
    assert guide.active
    assert guide.matcher.accept_string('": "yes", "ok": true, "note": "x"}')
    assert guide.matcher.accept_token(llm.engine.tokenizer.eos_token_id)


def test_json_object_mode_starts_an_object(llm: LLM) -> None:
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40, guided=GuidedDecoding(), seed=0))
    choice = out[0].outputs[0]
    assert choice.text.startswith("{")
    if choice.finish_reason == "stop":  # a random model may also run out of tokens mid-object
        assert isinstance(json.loads(choice.text, strict=False), dict)


def test_grammar_state_survives_preemption(
    mixtral_checkpoint: Path, llm: LLM, preemptions: Callable[[LLM], Preemptions]
) -> None:
    params = SamplingParams(max_tokens=100, temperature=0.0, guided=GUIDED)
    roomy = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    tight = LLM(model=str(mixtral_checkpoint), max_model_len=128, kv_cache_blocks=10)
    watched = preemptions(tight)
    assert [o.text for o in tight.generate(PROMPTS, params)] == [c.text for c in roomy]
    assert watched.count > 0 and tight.engine.blocks.num_used == 0
    for choice in roomy:
        assert choice.finish_reason == "stop", choice.text
        assert_matches_schema(choice.text)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_that_allows_no_token_fails_its_request_alone(
    llm: LLM, temperature: float
) -> None:
    """A regex no text matches leaves its row no token: that request ends with an error for its
    client (400 on the server), its neighbours' outputs stay what they are alone, and its KV
    blocks are freed."""
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(PROMPTS[1:], free)]
    engine, never = llm.engine, GuidedDecoding(regex=r"[^\s\S]")
    engine.add_request("never", [1, 5, 9], SamplingParams(temperature=temperature, guided=never))
    for i, prompt in enumerate(PROMPTS[1:]):
        engine.add_request(f"free-{i}", llm.tokenizer.encode(prompt), free)
    finished: dict[str, list[int]] = {}
    errors = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                errors.append((out.request_id, out.finished, out.outputs[0].finish_reason))
            elif out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert errors == [("never", True, "abort")]
    assert [finished[f"free-{i}"] for i in range(len(alone))] == alone
    assert engine.blocks.num_used == 0
    with pytest.raises(RequestError, match="allows no token"):
        llm.generate(PROMPTS[:2], [SamplingParams(guided=never), free])
    assert not engine.has_unfinished() and engine.blocks.num_used == 0


def test_a_schema_xgrammar_cannot_take_is_refused(llm: LLM) -> None:
    bad = GuidedDecoding(json.dumps({"properties": {"a": {"$ref": "#/nowhere"}}}))
    with pytest.raises(RequestError) as info:
        llm.generate(PROMPTS[0], SamplingParams(guided=bad))
    assert info.value.param == "response_format" and "nowhere" in str(info.value)
    assert not llm.engine.has_unfinished()


def test_min_tokens_and_a_grammar_do_not_mix() -> None:
    with pytest.raises(RequestError) as info:  # a complete grammar allows only its stop token
        SamplingParams(min_tokens=2, guided=GUIDED)
    assert info.value.param == "min_tokens"


def test_schemas_that_would_stall_the_compiler_are_refused(llm: LLM) -> None:
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    for schema, words in ((deep, "nests"), ({"enum": ["x" * 70000]}, "characters")):
        params = SamplingParams(guided=GuidedDecoding(json.dumps(schema)))
        with pytest.raises(RequestError, match=words) as info:
            llm.generate(PROMPTS[0], params)
        assert info.value.param == "response_format"


CHOICES = ("yes", 'no "way"', "a\\b", "line\nbreak")


@pytest.mark.parametrize(
    ("guided", "matches"),
    [
        (GuidedDecoding(regex=r"[0-9]{3}-[a-z]{2,5}"), re.compile(r"[0-9]{3}-[a-z]{2,5}")),
        (GuidedDecoding(choice=CHOICES), re.compile("|".join(map(re.escape, CHOICES)))),
        (
            GuidedDecoding(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'),
            re.compile(r"\([0-9]+(\+[0-9]+)*\)"),
        ),
    ],
    ids=["regex", "choice", "grammar"],
)
def test_regex_choice_and_grammar_hold_greedy_and_sampled(
    llm: LLM, guided: GuidedDecoding, matches: re.Pattern[str]
) -> None:
    """vLLM's other structured outputs: the whole text matches, and sampling still varies it."""
    params = [
        SamplingParams(max_tokens=30, temperature=0.0, guided=guided),
        SamplingParams(max_tokens=30, temperature=1.0, seed=2, n=6, guided=guided),
    ]
    greedy, sampled = llm.generate(PROMPTS[:2], params)
    texts = [c.text for c in greedy.outputs + sampled.outputs if c.finish_reason == "stop"]
    assert len(texts) >= 5  # max_tokens may cut a long regex or grammar match short
    assert all(matches.fullmatch(t) for t in texts), texts
    assert len(set(texts)) > 1


@pytest.mark.parametrize(
    ("guided", "words"),
    [
        (GuidedDecoding(regex="(["), "invalid regex: .*Unclosed"),
        (GuidedDecoding(grammar="root ::= missing"), "invalid grammar: .*missing"),
        (GuidedDecoding(choice=("x" * 70000,)), "characters"),
    ],
)
def test_a_bad_regex_or_grammar_is_refused(llm: LLM, guided: GuidedDecoding, words: str) -> None:
    with pytest.raises(RequestError, match=words) as info:
        llm.generate(PROMPTS[0], SamplingParams(guided=guided))
    assert info.value.param == "response_format"
    assert not llm.engine.has_unfinished()


def test_one_kind_of_structure_at_a_time() -> None:
    with pytest.raises(RequestError, match="one of"):
        GuidedDecoding(json.dumps(SCHEMA), regex="a+")
    with pytest.raises(RequestError, match="at least one"):
        GuidedDecoding(choice=())


def test_a_schema_given_as_a_dict_is_kept_as_its_json_text(llm: LLM) -> None:
    """As vLLM's takes either: a dict failed in the engine's compile cache (unhashable type)."""
    assert GuidedDecoding(SCHEMA) == GUIDED
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=60, guided=GuidedDecoding(SCHEMA)))
    assert_matches_schema(out[0].text)


def test_concurrent_compiles_of_one_grammar_compile_it_once(llm: LLM) -> None:
    """A completions batch's prompts compile their shared grammar together, each in a worker
    thread: one compiles, the others wait and share it (the cache alone would compile it in
    each thread that missed)."""
    grammars = llm.engine.grammars
    real = grammars._compiler
    calls: list[str] = []

    class Slow:
        def compile_json_schema(self, schema: str, **options: object) -> object:
            calls.append(schema)
            time.sleep(0.2)  # long enough for every thread to miss the cache at once
            return real.compile_json_schema(schema, **options)

        def compile_regex(self, regex: str) -> object:
            calls.append(regex)
            time.sleep(0.2)
            raise RuntimeError("[00:00:00] regex.cc:1: Regex parsing error: bad")

    refusals: list[str] = []

    def compile_one(guided: GuidedDecoding) -> None:
        try:
            grammars.compile(guided)
        except RequestError as exc:
            refusals.append(str(exc))

    grammars.__dict__["_compiler"] = Slow()
    try:
        for guided in (
            GuidedDecoding(json.dumps({**SCHEMA, "title": "once"})),
            GuidedDecoding(regex="(never"),  # a refusal is shared too, not compiled 4 times
        ):
            threads = [threading.Thread(target=compile_one, args=(guided,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        grammars.__dict__["_compiler"] = real
    assert len(calls) == 2 and len(refusals) == 4 and not grammars._inflight


def test_a_blocked_choices_siblings_count_no_dropped_token(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When one choice of an n=2 request can take no token, the whole request ends and its
    sibling's token of that step is dropped: generated tokens count only the tokens kept."""
    import engine.runner as runner

    engine, real_sample, calls = llm.engine, runner.sample, []

    def block_first_choice_at_third_step(logits, seqs, generator):  # noqa: ANN001, ANN202
        drawn = real_sample(logits, seqs, generator)
        calls.append(1)
        return [None, *drawn[1:]] if len(calls) == 3 else drawn

    monkeypatch.setattr(runner, "sample", block_first_choice_at_third_step)
    counted = engine.metrics.generation_tokens._value.get()
    engine.add_request("pair", [1, 5, 9], SamplingParams(n=2, max_tokens=8, ignore_eos=True))
    kept = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.error is not None
                kept = sum(len(o.token_ids) for o in out.outputs)
    assert kept == 4  # two steps of two choices; the third step's token of choice 2 is dropped
    assert engine.metrics.generation_tokens._value.get() - counted == kept
