"""The predictor commands' --out handling, their warnings (too few documents, another model), and
README's predictor example (its corpus must hold enough documents on a fresh checkout)."""

from __future__ import annotations

import glob
import re
import shlex
import shutil
from pathlib import Path

import pytest

from engine import LLM
from engine.offload.predict.train import MIN_DOCUMENTS
from server.cli import main, parse_args

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_on_a_file_system_that_takes_no_files_is_refused_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """/proc passes os.access for root: the trace or training ran to its end and then died in
    safetensors' save with a SafetensorError traceback. A file made and dropped there says so."""
    corpus, nowhere = write_corpus(tmp_path / "corpus", 3), tmp_path / "no-model"
    assert trace(nowhere, corpus, Path("/proc/expertflow-traces.safetensors")) == 2
    assert "cannot be written" in caplog.text and "no config.json" not in caplog.text


def test_trace_warns_when_train_predictor_needs_more_documents(
    mixtral_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus = write_corpus(tmp_path / "corpus", MIN_DOCUMENTS)
    assert trace(mixtral_checkpoint, corpus, tmp_path / "enough.safetensors") == 0
    assert "train-predictor needs" not in caplog.text
    assert trace(mixtral_checkpoint, corpus[:2], tmp_path / "two.safetensors") == 0
    assert f"traced 2 documents, and train-predictor needs {MIN_DOCUMENTS}" in caplog.text


def test_readme_predictor_example_has_enough_documents() -> None:
    """On a fresh checkout, the example's --corpus names files of the repository itself."""
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")  # continued lines joined
    line = next(x for x in readme.splitlines() if re.match(r"\.venv/bin/expertflow trace ", x))
    argv = shlex.split(line)
    assert Path(ROOT, argv[argv.index("--model") + 1], "config.json").is_file()
    patterns = argv[argv.index("--corpus") + 1 : argv.index("--out")]
    files = [f for p in patterns for f in glob.glob(p, root_dir=ROOT)]
    assert len(files) >= MIN_DOCUMENTS and all(Path(ROOT, f).is_file() for f in files)


def test_another_model_with_the_same_dims_is_warned_about(
    mixtral_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = Path(shutil.copytree(mixtral_checkpoint, tmp_path / "other-model"))
    corpus = write_corpus(tmp_path / "corpus", 3)
    traces, other_traces = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert trace(mixtral_checkpoint, corpus, traces) == 0
    assert trace(other, corpus, other_traces) == 0
    predictor = tmp_path / "rpp.safetensors"
    train = ["train-predictor", "--kind", "rpp", "--traces", str(traces), "--epochs", "1"]
    same = f"{mixtral_checkpoint.parent}/./{mixtral_checkpoint.name}"  # one model, other spelling
    caplog.clear()
    assert main([*train, "--out", str(predictor), "--model", same]) == 0
    assert main(["eval-predictor", "--traces", str(traces), "--predictor", str(predictor)]) == 0
    LLM(model=same, predictor="rpp", predictor_path=str(predictor))
    assert "was recorded on model" not in caplog.text
    warning = f"was recorded on model {mixtral_checkpoint.resolve()}, not"
    for argv in (
        [*train, "--out", str(tmp_path / "p2.safetensors"), "--model", str(other)],
        ["eval-predictor", "--traces", str(traces), "--kind", "pregate", "--model", str(other)],
        ["eval-predictor", "--traces", str(other_traces), "--predictor", str(predictor)],
    ):
        caplog.clear()
        assert main(argv) == 0
        assert warning in caplog.text
    caplog.clear()
    LLM(model=str(other), predictor="rpp", predictor_path=str(predictor))
    assert f"predictor {predictor} {warning} {other}" in caplog.text


@pytest.mark.parametrize("lr", ["inf", "nan", "0"])
def test_train_predictor_needs_a_finite_positive_lr(
    lr: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--lr inf passed the `lr <= 0` check and trained to NaN weights, written as a predictor;
    NaN failed only later, in torch's words."""
    argv = ["train-predictor", "--kind", "rpp", "--traces", str(tmp_path / "t.safetensors")]
    assert main([*argv, "--out", str(tmp_path / "p.safetensors"), "--lr", lr]) == 2
    assert f"lr={float(lr)} must be > 0" in caplog.text


def test_trace_routes_in_the_dtype_serve_would_use() -> None:
    """A trace in another dtype than serving's can route near ties differently; both commands
    default to the same rule (auto: float32 on the CPU, the checkpoint's 16-bit dtype on CUDA)."""
    trace = ["trace", "--corpus", "a.txt", "--out", "t.safetensors"]
    assert parse_args(trace).dtype == parse_args(["serve"]).dtype == "auto"
    assert parse_args([*trace, "--dtype", "bfloat16"]).dtype == "bfloat16"
