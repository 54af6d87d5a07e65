"""How `expertflow trace` reads a corpus: documents, the token budget, and the files it warns on."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.config import DEFAULT_MODEL
from engine.offload.predict.corpus import fair_shares, read_corpus
from server.cli import main


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    """The demo model's tokenizer, which starts every text with a start token, as most do."""
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def write(root: Path, name: str, data: str | bytes) -> Path:
    path = root / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_files_without_text_are_skipped_and_a_corpus_of_none_refused(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = [write(tmp_path, f"empty{i}.txt", "") for i in range(3)]
    assert tokenizer("")["input_ids"]  # the start token alone: not a document
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tokenizer, empty, seq_len=16, max_tokens=None)
    text = write(tmp_path, "text.txt", "def add(a, b):\n    return a + b\n")
    documents, chunks = read_corpus(tokenizer, [empty[0], text], seq_len=16, max_tokens=None)
    assert documents == [str(text.resolve())] and {doc for doc, _ in chunks} == {0}
    assert f"corpus file {empty[0]} holds no text; skipped" in caplog.text


def test_max_tokens_is_shared_over_every_file(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    files = [write(tmp_path, f"{i}.txt", f"word{i} " * 200) for i in range(4)]
    files.append(write(tmp_path, "short.txt", "tiny"))
    lengths = [len(tokenizer(f.read_text())["input_ids"]) for f in files]
    assert min(lengths[:4]) > 100 and lengths[4] < 10
    documents, chunks = read_corpus(tokenizer, files, seq_len=64, max_tokens=200)
    kept = [sum(len(c) for d, c in chunks if d == doc) for doc in range(len(documents))]
    assert len(documents) == 5 and sum(kept) <= 200
    assert kept[4] == lengths[4]  # the short file keeps all it has
    assert kept[:4] == [(200 - lengths[4]) // 4] * 4  # and leaves the rest to the others
    assert all(len(c) <= 64 for _, c in chunks)


def test_fair_shares() -> None:
    assert fair_shares([5, 100, 100], 105) == [5, 50, 50]
    assert fair_shares([5, 10], 100) == [5, 10]  # all of every file
    assert fair_shares([100, 100, 100], 2) == [1, 1, 1]  # at least one token each


def test_binary_and_repeated_files_warn(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    binary = write(tmp_path, "blob.bin", b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    latin1 = write(tmp_path, "latin1.txt", "café".encode("latin-1"))
    text = write(tmp_path, "text.txt", "plain text")
    (tmp_path / "sub").mkdir()
    again = tmp_path / "sub" / ".." / "text.txt"  # the same file by another name
    documents, _ = read_corpus(tokenizer, [binary, latin1, text, again], 16, None)
    assert documents == [str(binary.resolve()), str(latin1.resolve()), str(text.resolve())]
    assert f"corpus file {binary} is not UTF-8 text" in caplog.text
    assert f"corpus file {latin1} is not UTF-8 text" in caplog.text
    assert f"corpus file {again} is given more than once" in caplog.text
    caplog.clear()
    read_corpus(tokenizer, [write(tmp_path, "nul.txt", "a\x00b")], 16, None)
    assert "holds NUL bytes" in caplog.text


def test_trace_refuses_a_corpus_of_empty_files(
    mixtral_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = [str(write(tmp_path, f"{i}.txt", "")) for i in range(3)]
    out = tmp_path / "traces.safetensors"
    argv = ["trace", "--model", str(mixtral_checkpoint), "--corpus", *corpus, "--out", str(out)]
    assert main(argv) == 2
    assert "the corpus holds no text" in caplog.text and not out.exists()
