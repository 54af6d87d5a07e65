"""eval-predictor scores a predictor only on documents it was not trained on, whatever order the
traces list them in and whatever split flags it is given (the predictor file records them)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.offload.predict import documents
from engine.offload.predict.documents import TrainedDocuments
from engine.offload.predict.rpp import read_predictor_header
from engine.offload.predict.trace import TraceSet
from engine.offload.predict.train import TrainConfig, train_predictor
from server.cli import main
from tests.synthetic_traces import reorder, rewrite_header, synthetic_traces

CFG = TrainConfig(epochs=1, hidden_dim=8, embed_dim=4)
NUM_DOCS = 10


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path, set[str]]:
    """(traces, predictor, names of the documents training held out)."""
    traces, predictor = tmp_path / "traces.safetensors", tmp_path / "rpp.safetensors"
    synthetic_traces(NUM_DOCS).save(traces)
    train_predictor("rpp", traces, predictor, CFG)
    return traces, predictor, names(synthetic_traces(NUM_DOCS).split(CFG.holdout, CFG.seed)[1])


def names(traces: TraceSet) -> set[str]:
    return {traces.meta.documents[d] for d in traces.doc_ids.unique().tolist()}


def test_the_same_corpus_in_another_order_holds_out_what_training_did(
    trained: tuple[Path, Path, set[str]],
) -> None:
    _, predictor, held = trained
    recorded = TrainedDocuments.from_info(read_predictor_header(predictor)["info"], predictor)
    shuffled = reorder(synthetic_traces(NUM_DOCS), list(range(NUM_DOCS))[::-1])
    assert names(shuffled.split(CFG.holdout, CFG.seed)[1]) != held  # a split by position
    seen, unseen = recorded.split(shuffled)
    assert names(unseen) == held and not names(seen) & held
    # copies under other names are known by their tokens, truncated ones by their names
    renamed = reorder(shuffled, list(range(NUM_DOCS)), [f"copy{i}" for i in range(NUM_DOCS)])
    assert len(recorded.split(renamed)[1].doc_ids.unique()) == len(held)
    cut = synthetic_traces(NUM_DOCS).select_documents(torch.arange(NUM_DOCS))
    cut = replace(cut, **{n: t[cut.positions < 7] for n, t in cut.tensors().items()})
    assert names(recorded.split(cut)[1]) == held


@pytest.mark.parametrize("flags", [[], ["--seed", "5"], ["--holdout", "0.6"]])
def test_eval_counts_only_the_held_out_documents(
    trained: tuple[Path, Path, set[str]],
    flags: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    traces, predictor, held = trained
    caplog.set_level("INFO")
    shuffled = tmp_path / "shuffled.safetensors"
    reorder(synthetic_traces(NUM_DOCS), [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]).save(shuffled)
    for path in (traces, shuffled):
        capsys.readouterr()
        argv = ["eval-predictor", "--traces", str(path), "--predictor", str(predictor), *flags]
        assert main(argv) == 0
        tokens = sum(12 + int(name.removeprefix("doc")) for name in held)
        assert f"on {tokens} held-out tokens of {len(held)} documents" in capsys.readouterr().out
        assert f"evaluating on {len(held)} documents ({tokens} tokens)" in caplog.text


def test_eval_refuses_traces_of_only_trained_documents(
    trained: tuple[Path, Path, set[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, predictor, held = trained
    full = synthetic_traces(NUM_DOCS)
    train_only = tmp_path / "train-only.safetensors"
    keep = [d for d in range(NUM_DOCS) if full.meta.documents[d] not in held]
    reorder(full, keep).save(train_only)
    argv = ["eval-predictor", "--traces", str(train_only), "--predictor", str(predictor)]
    assert main(argv) == 2
    assert "was trained on every document of the traces" in caplog.text


def test_traces_of_other_text_split_for_the_baselines(
    trained: tuple[Path, Path, set[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, predictor, _ = trained
    other = tmp_path / "other.safetensors"
    new_text = synthetic_traces(4, seed=1)
    reorder(new_text, list(range(4)), [f"new{i}" for i in range(4)]).save(other)
    argv = ["eval-predictor", "--traces", str(other), "--predictor", str(predictor)]
    assert main(argv) == 0
    assert "held-out tokens of 1 documents" in capsys.readouterr().out  # 0.2 of 4, the rest count


def test_a_predictor_without_its_documents_is_refused(
    trained: tuple[Path, Path, set[str]], caplog: pytest.LogCaptureFixture
) -> None:
    traces, predictor, _ = trained
    rewrite_header(predictor, "expertflow_predictor", lambda h: h["info"].pop("trained_documents"))
    assert main(["eval-predictor", "--traces", str(traces), "--predictor", str(predictor)]) == 2
    assert "does not record the documents it was trained on" in caplog.text


def test_copies_cut_by_another_budget_are_known_by_their_opening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy of the corpus elsewhere (other names) traced with another --max-tokens (other cut
    lengths) is still recognised: the digest covers a document's first PREFIX tokens only."""
    monkeypatch.setattr(documents, "PREFIX", 5)  # the synthetic documents are 12-21 tokens
    full = synthetic_traces(NUM_DOCS)
    recorded = TrainedDocuments.of(full.select_documents(torch.arange(4)))  # doc0 .. doc3
    copies = reorder(full, list(range(NUM_DOCS)), [f"copy{i}" for i in range(NUM_DOCS)])
    cut = replace(copies, **{n: t[copies.positions < 7] for n, t in copies.tensors().items()})
    seen, unseen = recorded.split(cut)
    assert names(seen) == {f"copy{i}" for i in range(4)}
    assert len(unseen.doc_ids.unique()) == NUM_DOCS - 4
