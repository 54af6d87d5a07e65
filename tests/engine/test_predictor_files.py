"""Damaged trace and predictor files (truncated, not safetensors, hand-edited headers) are refused
by the commands in one line naming the file, exit 2, on small synthetic traces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.offload.predict.train import TrainConfig, train_predictor
from server.cli import main
from tests.synthetic_traces import E, rewrite_header, synthetic_traces


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
    elif how == "older format":
        rewrite_header(path, "expertflow_trace", lambda h: h.update(format=0))
    elif how == "no metadata":
        save_file({"token_ids": torch.zeros(1)}, str(path))


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
    "older format",
    "no metadata",
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
    elif how == "no trained documents":
        rewrite_header(path, key, lambda h: h["info"].pop("trained_documents"))
    elif how == "bad trained documents":
        rewrite_header(path, key, lambda h: h["info"].update(trained_documents={"names": [1]}))
    elif how == "no kind":
        rewrite_header(path, key, lambda h: h.pop("kind"))
    elif how == "wider":
        rewrite_header(path, key, lambda h: h["config"].update(hidden_dim=9))
    elif how == "unknown config":
        rewrite_header(path, key, lambda h: h["config"].update(depth=3))
    elif how == "older format":
        rewrite_header(path, key, lambda h: h.update(format=0))
    elif how == "no metadata":
        save_file({"w": torch.zeros(1)}, str(path))


PREDICTOR_DAMAGE = (
    "truncated",
    "text",
    "not json",
    "not an object",
    "no info",
    "no trained documents",
    "bad trained documents",
    "no kind",
    "wider",
    "unknown config",
    "older format",
    "no metadata",
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
