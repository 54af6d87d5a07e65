"""engine/detokenizer.py: incremental text follows a full decode at every step, multi-byte
characters included, and a finished sequence's text is exactly `tokenizer.decode`."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.config import DEFAULT_MODEL
from engine.detokenizer import REPLACEMENT_CHAR, Detokenizer
from engine.sampling import SamplingParams
from engine.sequence import Sequence

TEXT = "héllo wörld — 日本語 test ✓ done\n\tdef f(x): return x ** 2  # ünïcödé"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def feed(
    tokenizer: PreTrainedTokenizerBase, prompt: list[int], output: list[int], params: SamplingParams
) -> list[str]:
    """Append `output` one token at a time; the sequence's text after each step."""
    detok = Detokenizer(tokenizer, eos_token_ids=(1,), max_model_len=10_000)
    seq = Sequence("r", 0, list(prompt), len(prompt), params, params.max_tokens, None)
    seq.stop_token_ids = frozenset(params.stop_token_ids)  # as the engine sets them (EOS aside)
    texts = []
    for token in output:
        detok.append(seq, token, None)
        texts.append(seq.text)
        if seq.finished:
            break
    return texts


def full(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_incremental_text_follows_a_full_decode_every_step(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    prompt, output = tokenizer.encode("Say:"), tokenizer.encode(TEXT)
    texts = feed(tokenizer, prompt, output, SamplingParams(max_tokens=len(output), ignore_eos=True))
    assert len(texts) == len(output)
    for n, text in enumerate(texts, start=1):  # a piece waits while its character is partial
        complete = full(tokenizer, output[:n]).rstrip(REPLACEMENT_CHAR)
        assert complete.startswith(text) and len(complete) - len(text) <= 1
    assert texts[-1] == full(tokenizer, output) == TEXT


def test_a_stop_token_ends_the_text_without_its_own_piece(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    output = tokenizer.encode(TEXT)
    stop_at = len(output) // 2
    params = SamplingParams(max_tokens=len(output), stop_token_ids=[output[stop_at]])
    texts = feed(tokenizer, [], output, params)
    assert len(texts) == stop_at + 1
    assert texts[-1] == full(tokenizer, output[:stop_at])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_text_when_not_skipped(
    tokenizer: PreTrainedTokenizerBase, skip: bool
) -> None:
    """vLLM's skip_special_tokens=False: markers such as Mistral's [TOOL_CALLS] reach the text."""
    pad = tokenizer.convert_tokens_to_ids("<|pad|>")
    output = [*tokenizer.encode("a b"), pad, *tokenizer.encode(" c")]
    params = SamplingParams(max_tokens=len(output), ignore_eos=True, skip_special_tokens=skip)
    texts = feed(tokenizer, [], output, params)
    assert ("<|pad|>" in texts[-2]) is not skip  # streamed (incremental) text
    assert texts[-1] == tokenizer.decode(output, skip_special_tokens=skip)  # final text


def test_byte_fallback_tokens_carry_their_byte() -> None:
    """A SentencePiece tokenizer's byte tokens (Llama's, Mixtral's) give their byte for a
    logprob's `bytes`, where their text alone is U+FFFD; other tokens give their text's."""

    class SentencePieceLike:
        def convert_ids_to_tokens(self, token_id: int) -> str:
            return {0: "<0xE2>", 1: "\u2581the"}[token_id]

        def decode(self, token_ids: list[int], **kwargs: object) -> str:
            return {0: "\ufffd", 1: "the"}[token_ids[0]]

    detokenizer = Detokenizer(SentencePieceLike(), (), 64)
    assert detokenizer.token_bytes(0) == [0xE2] and detokenizer.token_bytes(1) == list(b"the")
