"""Appends a sampled token to a sequence: stop checks, detokenization, stop strings, held-back text.

Text grows incrementally with the `tokenizers` library's DecodeStream (one token's piece per step,
instead of re-decoding the whole output every step: quadratic in its length); a finished
sequence's text is decoded once in full, so final text is exactly `tokenizer.decode` of its tokens.
"""

from __future__ import annotations

import functools
import re

from tokenizers.decoders import DecodeStream
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.outputs import TokenLogprob
from engine.sampler import Logprob
from engine.sequence import Sequence

REPLACEMENT_CHAR = "\ufffd"
BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's alphabet
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


def byte_level(backend: object) -> bool:
    """Whether a `tokenizers` tokenizer's decoder maps characters back to bytes (GPT-2's BPE)."""
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and '"ByteLevel"' in decoder.__getstate__().decode()


class Detokenizer:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.byte_level = byte_level(self.backend)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    @functools.cache  # noqa: B019 (one detokenizer per engine, as long-lived as its tokenizer)
    def token_text(self, token_id: int) -> str:
        """One token on its own, special tokens included (the `token` of an OpenAI logprob, as
        vLLM). Cached: prompt logprobs ask for k + 1 texts per prompt token."""
        return self.tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    @functools.cache  # noqa: B019
    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (OpenAI's logprob `bytes`, which rebuild a character split
        across tokens): a byte-level BPE token's characters mapped back to their bytes, a
        byte-fallback token's byte, else its text's UTF-8."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if self.byte_level and all(char in BYTE_OF for char in piece):
            return [BYTE_OF[char] for char in piece]
        if match := BYTE_FALLBACK.fullmatch(piece):
            return [int(match.group(1), 16)]
        return list(self.token_text(token_id).encode("utf-8"))

    def token_logprob(self, token: int, logprob: Logprob) -> TokenLogprob:
        chosen, rank, top = logprob
        top_texts = [(i, self.token_text(i), lp) for i, lp in top]
        top_bytes = [self.token_bytes(i) for i, _ in top]
        return TokenLogprob(
            token,
            self.token_text(token),
            chosen,
            top_texts,
            rank,
            self.token_bytes(token),
            top_bytes,
        )

    def append(self, seq: Sequence, token: int, logprob: Logprob | None) -> None:
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs = seq.logprobs or []
            seq.logprobs.append(self.token_logprob(token, logprob))
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif token in seq.stop_token_ids:  # a set: the request's list may be long
            seq.finish_reason, seq.stop_reason = "stop", token
        elif len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if (
            seq.guide is not None
            and seq.guide.active
            and seq.guide.accept(token)
            and not seq.finished
        ):
            seq.finish_reason = "stop"  # the grammar is complete: it took one of its stop tokens
        shown = seq.output_token_ids
        if seq.finish_reason == "stop" and not p.include_stop_str_in_output:
            shown = shown[:-1]  # as vLLM: the EOS / stop token that ended the text is not rendered
        before = len(seq.text)  # where the newest token's text starts
        if seq.finished or self.backend is None:
            seq.text = self.decode(shown, p.skip_special_tokens)
        else:
            if seq.decode_stream is None:  # new, or resumed after a restart: catch up first
                seq.decode_stream = DecodeStream(skip_special_tokens=p.skip_special_tokens)
                seq.text = "".join(self._pieces(seq.decode_stream, shown[:-1]))
                before = len(seq.text)
            seq.text += "".join(self._pieces(seq.decode_stream, [token]))
        if seq.guide is not None:
            seq.guide.watch(seq.text, before)
        if p.stop and len(seq.output_token_ids) >= p.min_tokens:
            self._check_stop_strings(seq, before)
        seq.visible_text = seq.text if seq.finished else self._held_back(seq)

    def _check_stop_strings(self, seq: Sequence, before: int) -> None:
        """A stop string counts only where it ends inside the newest token's text (from
        `before`): an earlier one was either caught then or, below min_tokens, let pass."""
        hits = [(seq.text.find(s, max(0, before - len(s) + 1)), s) for s in seq.params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return
        at, stop = min(hits)
        seq.text = (
            seq.text[: at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
        )
        seq.finish_reason, seq.stop_reason = "stop", stop

    def _pieces(self, stream: DecodeStream, token_ids: list[int]) -> list[str]:
        """The text each token completes (none while a multi-byte character is still partial)."""
        return [piece for t in token_ids if (piece := stream.step(self.backend, t))]

    @staticmethod
    def _held_back(seq: Sequence) -> str:
        """Text safe to stream: without a trailing partial character or a possible stop-string prefix."""
        text = seq.text.rstrip(REPLACEMENT_CHAR)
        longest = max((len(s) for s in seq.params.stop), default=0)
        if longest > 1:
            text = text[: max(len(seq.visible_text), len(text) - (longest - 1))]
        return text if text.startswith(seq.visible_text) else seq.visible_text
