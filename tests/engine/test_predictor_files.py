"""Damaged trace and predictor files (truncated, not safetensors, hand-edited headers) are refused
by the commands in one line naming the file, exit 2, on small synthetic traces."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.offload.predict.trace import TraceMeta, TraceSet
from engine.offload.predict.train import TrainConfig, train_predictor
from server.cli import main

L, E, K, VOCAB, SEQ = 3, 4, 2, 50, 16


def synthetic_traces(num_docs: int, tokens_per_doc: int = 20, seed: int = 0) -> TraceSet:
    """Random routing of random tokens: `num_docs` documents of one or two sequences each."""
    g = torch.Generator().manual_seed(seed)
    n = num_docs * tokens_per_doc
    documents = tuple(f"doc{i}" for i in range(num_docs))
    meta = TraceMeta("tiny-model", tuple(range(L)), E, K, VOCAB, SEQ, documents)
    probs = torch.rand(n, L, E, generator=g).softmax(-1)
    pairs = len(meta.pairs)
    return TraceSet(
        meta=meta,
        token_ids=torch.randint(0, VOCAB, (n,), generator=g, dtype=torch.int32),
        positions=(torch.arange(n) % tokens_per_doc % SEQ).to(torch.int32),
        doc_ids=(torch.arange(n) // tokens_per_doc).to(torch.int32),
        topk_ids=probs.topk(K, -1).indices.to(torch.int16),
        probs=probs.half(),
        pregate=torch.rand(n, pairs, E, generator=g).softmax(-1).half(),
    )


def rewrite_header(path: Path, key: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Hand-edit the JSON under metadata `key` of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()[key])
    edit(header)
    save_file(tensors, str(path), metadata={key: json.dumps(header)})


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    traces, predictor = tmp_path / "traces.safetensors", tmp_path / "rpp.safetensors"
    synthetic_traces(6).save(traces)
    train_predictor("rpp", traces, predictor, TrainConfig(epochs=1, hidden_dim=8, embed_dim=4))
    return traces, predictor


def assert_refused(argv: list[str], path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    assert main(argv) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    assert str(path) in message and "\n" not in message, message


def damage_trace(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "text":
        path.write_text("token,expert\n1,2\n")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bad json":
        rewrite_header(path, "expertflow_trace", lambda h: h.clear())  # no "format"
    elif how == "no documents":
        rewrite_header(path, "expertflow_trace", lambda h: h.pop("documents"))
    elif how == "unknown field":
        rewrite_header(path, "expertflow_trace", lambda h: h.update(extra=1))
    elif how == "more experts":
        rewrite_header(path, "expertflow_trace", lambda h: h.update(num_experts=E + 1))
    elif how == "fewer documents":
        rewrite_header(path, "expertflow_trace", lambda h: h.update(documents=["d0"]))
    elif how == "string dims":
        rewrite_header(path, "expertflow_trace", lambda h: h.update(moe_layers=7))


TRACE_DAMAGE = (
    "truncated",
    "text",
    "empty",
    "bad json",
    "no documents",
    "unknown field",
    "more experts",
    "fewer documents",
    "string dims",
)


@pytest.mark.parametrize("how", TRACE_DAMAGE)
def test_damaged_traces_are_refused_in_a_line(
    files: tuple[Path, Path], how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    traces, predictor = files
    damage_trace(traces, how)
    assert_refused(["eval-predictor", "--traces", str(traces), "--kind", "pregate"], traces, caplog)
    train = ["train-predictor", "--kind", "rpp", "--traces", str(traces)]
    assert_refused([*train, "--out", str(tmp_path / "new.safetensors")], traces, caplog)


def damage_predictor(path: Path, how: str) -> None:
    key = "expertflow_predictor"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "text":
        path.write_text("weights")
    elif how == "not json":
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        save_file(tensors, str(path), metadata={key: "{kind: rpp"})
    elif how == "not an object":
        save_file({"w": torch.zeros(1)}, str(path), metadata={key: "[1]"})
    elif how == "no info":
        rewrite_header(path, key, lambda h: h.pop("info"))
    elif how == "no training":
        rewrite_header(path, key, lambda h: h["info"].pop("training"))
    elif how == "no kind":
        rewrite_header(path, key, lambda h: h.pop("kind"))
    elif how == "wider":
        rewrite_header(path, key, lambda h: h["config"].update(hidden_dim=9))
    elif how == "unknown config":
        rewrite_header(path, key, lambda h: h["config"].update(depth=3))


PREDICTOR_DAMAGE = (
    "truncated",
    "text",
    "not json",
    "not an object",
    "no info",
    "no training",
    "no kind",
    "wider",
    "unknown config",
)


@pytest.mark.parametrize("how", PREDICTOR_DAMAGE)
def test_damaged_predictors_are_refused_in_a_line(
    files: tuple[Path, Path], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    traces, predictor = files
    damage_predictor(predictor, how)
    argv = ["eval-predictor", "--traces", str(traces), "--predictor", str(predictor)]
    assert_refused(argv, predictor, caplog)


def test_undamaged_files_are_read(files: tuple[Path, Path]) -> None:
    traces, predictor = files
    assert main(["eval-predictor", "--traces", str(traces), "--predictor", str(predictor)]) == 0
