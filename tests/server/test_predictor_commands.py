"""The predictor commands' --out handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main


def write_corpus(root: Path, count: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = [root / f"doc{i}.txt" for i in range(count)]
    for i, file in enumerate(files):
        file.write_text(f"def f{i}(x):\n    return x * {i} + {i}\n" * 4)
    return files


def trace(model: Path, corpus: list[Path], out: Path) -> int:
    argv = ["trace", "--model", str(model), "--corpus", *map(str, corpus), "--out", str(out)]
    return main([*argv, "--seq-len", "32"])


def test_out_folders_are_created(mixtral_checkpoint: Path, tmp_path: Path) -> None:
    traces = tmp_path / "runs" / "new" / "traces.safetensors"
    assert trace(mixtral_checkpoint, write_corpus(tmp_path / "corpus", 3), traces) == 0
    predictor = tmp_path / "predictors" / "rpp.safetensors"
    argv = ["train-predictor", "--kind", "rpp", "--traces", str(traces), "--out", str(predictor)]
    assert main([*argv, "--epochs", "1"]) == 0
    assert traces.is_file() and predictor.is_file()


def test_bad_out_is_refused_before_the_model_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model that does not exist: the --out error comes first, so it is checked first."""
    corpus, nowhere = write_corpus(tmp_path / "corpus", 3), tmp_path / "no-model"
    a_file = corpus[0]
    for out, error in [
        (tmp_path, "is a folder"),
        (corpus[1], "is one of the inputs"),
        (a_file / "traces.safetensors", "cannot create the folder"),
    ]:
        caplog.clear()
        assert trace(nowhere, corpus, out) == 2
        assert error in caplog.text and "no config.json" not in caplog.text
    before = a_file.read_bytes()
    argv = ["train-predictor", "--kind", "rpp", "--traces", str(a_file)]
    assert main([*argv, "--out", str(tmp_path / "corpus" / ".." / "corpus" / "doc0.txt")]) == 2
    assert "is one of the inputs" in caplog.text and a_file.read_bytes() == before
