"""A text corpus as `expertflow trace` reads it: one document per file, tokenized and cut into
prefill chunks, with a token budget shared fairly over the documents."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def read_corpus(
    tokenizer: PreTrainedTokenizerBase, files: list[Path], seq_len: int, max_tokens: int | None
) -> tuple[list[str], list[tuple[int, list[int]]]]:
    """(documents, [(doc_id, chunk of <= seq_len ids)]). A document is a file's resolved path; a
    file given twice counts once, and one with no text tokens (only the tokenizer's start token)
    is skipped, so an empty file never stands in for a document. `max_tokens` is shared out with
    `fair_shares`, so every document keeps some tokens for a held-out split to hold out."""
    special = set(tokenizer.all_special_ids)
    documents: list[str] = []
    token_ids: list[list[int]] = []
    seen: set[str] = set()
    for file in files:
        path = str(file.resolve())
        if path in seen:
            logger.warning("corpus file %s is given more than once; it is traced once", file)
            continue
        seen.add(path)
        ids = tokenizer(read_text(file), verbose=False)["input_ids"]
        if all(i in special for i in ids):
            logger.warning("corpus file %s holds no text; skipped", file)
            continue
        documents.append(path)
        token_ids.append(ids if max_tokens is None else ids[:max_tokens])  # no document needs more
    if not documents:
        raise ValueError("the corpus holds no text: every corpus file is empty")
    if max_tokens is not None:
        shares = fair_shares([len(ids) for ids in token_ids], max_tokens)
        token_ids = [ids[:share] for ids, share in zip(token_ids, shares, strict=True)]
    chunks = [
        (doc, ids[s : s + seq_len])
        for doc, ids in enumerate(token_ids)
        for s in range(0, len(ids), seq_len)
    ]
    return documents, chunks


def fair_shares(lengths: list[int], budget: int) -> list[int]:
    """Tokens each document keeps: min(its length, c) for the largest c that fits the budget, so a
    short document leaves the rest of its share to the others and none is starved; at least 1."""
    left, cap = budget, None
    for i, length in enumerate(sorted(lengths)):
        even = left // (len(lengths) - i)
        if length > even:
            cap = even
            break
        left -= length
    if cap is None:
        return list(lengths)
    return [min(length, max(1, cap)) for length in lengths]


def read_text(file: Path) -> str:
    """The file as UTF-8 text; bytes that are not (a binary file, another encoding) become U+FFFD,
    with a warning, since the trace would then route tokens of no real text."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("corpus file %s is not UTF-8 text; its undecodable bytes are replaced", file)
        return raw.decode("utf-8", errors="replace")
    if "\x00" in text:
        logger.warning("corpus file %s holds NUL bytes: is it a binary file?", file)
    return text
