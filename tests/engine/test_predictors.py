"""Routing traces, the RPP and hybrid predictors, their evaluation and the three CLI commands, on a
tiny random 4-MoE-layer checkpoint (and on the demo model when it is there)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.config import DEFAULT_MODEL
from engine.llm_engine import EngineStepError
from engine.models.model import MoECausalLM
from engine.offload.predict import PreGatePredictor, make_predictor
from engine.offload.predict import train as train_module
from engine.offload.predict.evaluate import evaluate, horizon_recall
from engine.offload.predict.hybrid import HybridNet
from engine.offload.predict.rpp import UNSEEN_ROW, RPPNet, read_predictor_header
from engine.offload.predict.trace import TraceSet, record_traces, trace_sequences
from engine.offload.predict.train import (
    FitReport,
    TrainConfig,
    token_rows,
    train_hybrid,
    train_predictor,
    train_rpp,
)
from engine.runner import context_windows
from server.cli import main

SEQ_LEN = 64
MAX_TOKENS = 1536
FIT = TrainConfig(epochs=12, batch_size=128, lr=1e-2, hidden_dim=128)


@pytest.fixture(scope="module")
def deep_checkpoint(mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Mixtral with 4 MoE layers, so there are horizons 1..3 to predict."""
    path = tmp_path_factory.mktemp("mixtral-4-layers")
    config = AutoConfig.from_pretrained(mixtral_checkpoint)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    AutoTokenizer.from_pretrained(mixtral_checkpoint).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six documents of real text: the sources of a few stdlib modules."""
    root = tmp_path_factory.mktemp("corpus")
    files = []
    for name in ("json", "textwrap", "inspect", "dataclasses", "argparse", "pathlib"):
        files.append(root / f"{name}.txt")
        files[-1].write_text(inspect.getsource(importlib.import_module(name))[:4000])
    return files


@pytest.fixture(scope="module")
def llm(deep_checkpoint: Path) -> LLM:
    return LLM(model=str(deep_checkpoint), max_model_len=SEQ_LEN)


@pytest.fixture(scope="module")
def traces(llm: LLM, corpus: list[Path]) -> TraceSet:
    return record_traces(llm, corpus, SEQ_LEN, MAX_TOKENS)


def test_trace_sequences_records_each_sequence_as_a_document(traces: TraceSet, llm: LLM) -> None:
    first = traces.select_documents(torch.tensor([0]))  # the first 64-token chunk of document 0
    chunk = first.token_ids[first.positions < SEQ_LEN][:SEQ_LEN].tolist()
    other = traces.token_ids[traces.doc_ids == 3][:20].tolist()
    seqs = trace_sequences(llm, [chunk, other], ["a", "b"])
    assert seqs.meta.documents == ("a", "b") and len(seqs) == len(chunk) + len(other)
    assert seqs.doc_ids.tolist() == [0] * len(chunk) + [1] * len(other)
    assert seqs.positions.tolist() == list(range(len(chunk))) + list(range(len(other)))
    # the same tokens route the same, whatever they were traced with
    assert torch.equal(seqs.topk_ids[: len(chunk)], first.topk_ids[: len(chunk)])


def test_trace_round_trip(traces: TraceSet, tmp_path: Path) -> None:
    traces.save(tmp_path / "t.safetensors")
    loaded = TraceSet.load(tmp_path / "t.safetensors")
    assert loaded.meta == traces.meta
    meta, N = loaded.meta, len(loaded)
    assert meta.num_layers == 4 and meta.num_experts == 8 and meta.top_k == 2
    assert N == MAX_TOKENS and len(meta.documents) == 6
    L, E, k, P = 4, 8, 2, 6
    for name, shape, dtype in [
        ("token_ids", (N,), torch.int32),
        ("positions", (N,), torch.int32),
        ("doc_ids", (N,), torch.int32),
        ("topk_ids", (N, L, k), torch.int16),
        ("probs", (N, L, E), torch.float16),
        ("pregate", (N, P, E), torch.float16),
    ]:
        tensor = getattr(loaded, name)
        assert tensor.shape == shape and tensor.dtype == dtype, name
        assert torch.equal(tensor, getattr(traces, name)), name
    # the top-k are the largest router probabilities, in descending order
    picked = loaded.probs.float().gather(2, loaded.topk_ids.long())  # [N, L, k]
    assert torch.equal(picked[..., 0], loaded.probs.float().max(dim=2).values)
    assert (picked[..., 0] >= picked[..., 1]).all()
    torch.testing.assert_close(loaded.probs.float().sum(-1), torch.ones(N, L), atol=1e-2, rtol=0)
    torch.testing.assert_close(loaded.pregate.float().sum(-1), torch.ones(N, P), atol=1e-2, rtol=0)
    # sequences of at most SEQ_LEN consecutive positions, a new one at each document
    pos, docs = loaded.positions.long(), loaded.doc_ids
    assert pos[0] == 0 and pos.max() == SEQ_LEN - 1
    assert ((pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)).all()
    assert (pos[1:][docs[1:] != docs[:-1]] == 0).all()


def test_traced_routing_equals_a_lone_forward(llm: LLM, traces: TraceSet) -> None:
    """A chunk traced in a batch of chunks routes as it does alone, and the pre-gate guess for the
    next layer is the router of that layer applied to the traced residual."""
    engine = llm.engine
    n = SEQ_LEN
    ids = traces.token_ids[:n].long()
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    class Capture:
        def on_route(
            self, layer: int, residual: torch.Tensor, logits: torch.Tensor, topk: torch.Tensor
        ) -> None:
            captured[layer] = (residual.clone(), topk.clone())

    assert engine.blocks.grow(-100, n)
    try:
        batch = engine.runner.prefill_batch([n], *engine.block_tables([-100]))
        with torch.inference_mode():
            engine.model(ids, torch.arange(n), batch, engine.offload.experts, Capture())
    finally:
        engine.blocks.free(-100)
    pregate = PreGatePredictor(engine.model)
    for i, layer in enumerate(traces.meta.moe_layers):
        residual, topk = captured[layer]
        assert torch.equal(topk.to(torch.int16), traces.topk_ids[:n, i])
        if i + 1 < traces.meta.num_layers:
            ahead = pregate.ahead(i, residual, ids, topk, horizon=1)  # [1, T, E]
            traced = traces.pregate[:n, traces.pair_index(i, i + 1)].float()
            torch.testing.assert_close(ahead[0], traced, atol=2e-3, rtol=0)


def test_split_by_document_is_disjoint_and_deterministic(traces: TraceSet) -> None:
    train, test = traces.split(0.34, seed=3)
    assert len(train) + len(test) == len(traces)
    train_docs, test_docs = set(train.doc_ids.tolist()), set(test.doc_ids.tolist())
    assert not train_docs & test_docs and len(test_docs) == 2
    again_train, again_test = traces.split(0.34, seed=3)
    assert torch.equal(again_test.doc_ids, test.doc_ids)
    assert torch.equal(again_train.token_ids, train.token_ids)
    one_doc = traces.select_documents(torch.tensor([0]))
    with pytest.raises(ValueError, match="at least 2 documents"):
        one_doc.split(0.5, seed=0)


def test_context_is_the_previous_ids_of_the_same_sequence(traces: TraceSet) -> None:
    context = traces.context(3)  # [N, 3]
    ids, pos = traces.token_ids.long(), traces.positions.long()
    for n in (0, 1, 2, 5, SEQ_LEN, SEQ_LEN + 1, len(traces) - 1):
        for back in (1, 2, 3):
            expected = ids[n - back] if pos[n] >= back else -1
            assert context[n, back - 1] == expected


def test_tokens_seen_once_train_the_row_unseen_ids_get() -> None:
    """Serving maps an id the traces never held to the unseen row: singletons share it in training,
    so it is learned (it kept its random init when every traced token had a row of its own)."""
    ids = torch.tensor([7, 7, 7, 3, 3, 5, 9, 9])  # 5 is seen once
    traces = SimpleNamespace(token_ids=ids, meta=SimpleNamespace(vocab_size=12))
    rows = token_rows(traces, max_rows=100)  # type: ignore[arg-type]
    assert rows[7] == 2 and rows[[3, 9]].tolist() in ([3, 4], [4, 3])  # most frequent first
    assert rows[5] == UNSEEN_ROW and rows[0] == UNSEEN_ROW  # seen once; never seen
    assert token_rows(traces, max_rows=3)[[7, 3, 9]].tolist() == [2, UNSEEN_ROW, UNSEEN_ROW]


def test_serving_context_is_the_context_predictors_trained_on(traces: TraceSet) -> None:
    """The runner builds each step's context as the traces do (nearest id first): a predictor fed
    its inputs in another order than it learned them loses recall, and nothing else fails."""
    window = 5
    seq = SimpleNamespace(token_ids=traces.token_ids[:SEQ_LEN].tolist())  # one traced sequence
    trained = traces.context(window)[:SEQ_LEN]  # [SEQ_LEN, W]
    assert torch.equal(context_windows([seq], [0], [SEQ_LEN], window), trained)  # a prefill
    chunk = context_windows([seq, seq], [7, SEQ_LEN - 1], [3, 1], window)  # a chunk, a decode
    assert torch.equal(chunk, trained[[7, 8, 9, SEQ_LEN - 1]])


def test_serving_context_is_on_the_device_of_the_step_tokens(deep_checkpoint: Path) -> None:
    """The runner hands the predictor each step's context where the step's token ids are (the
    model's device): the RPP concatenates the two, so a context left on the host failed every
    step of `--device cuda --predictor rpp`. The "meta" device stands in for a GPU: the step
    stops at the prefetcher, before the model runs."""
    llm = LLM(model=str(deep_checkpoint), max_model_len=SEQ_LEN, predictor="pregate")
    runner, seen = llm.engine.runner, {}

    class Stop(Exception):
        pass

    class Recorder:
        predictor = SimpleNamespace(context_window=3)

        def begin_step(self, token_ids: torch.Tensor, context: torch.Tensor) -> None:
            seen["devices"] = (token_ids.device, context.device)
            raise Stop

    runner.prefetcher, runner.device = Recorder(), torch.device("meta")  # type: ignore[assignment]
    with pytest.raises(EngineStepError) as failed:
        llm.generate([[1, 5, 9, 7]], SamplingParams(max_tokens=2))
    assert isinstance(failed.value.__cause__, Stop)
    assert seen["devices"] == (torch.device("meta"), torch.device("meta"))


def test_rpp_learns_and_round_trips(llm: LLM, traces: TraceSet, tmp_path: Path) -> None:
    net, report = train_rpp(traces, FIT)
    assert report == FitReport(FIT.epochs, [])  # no validation set: the last epoch
    table = evaluate(traces, traces, net)  # on its training data: can it learn at all?
    assert table.by_horizon("rpp", None) > table.by_horizon("frequent", None) + 0.1
    path = tmp_path / "rpp.safetensors"
    net.save(path, {"note": "test"})
    predictor = make_predictor("rpp", llm.engine.model, path)
    ids, context = traces.token_ids[:50].long(), traces.context(FIT.context_window)[:50]
    probs = predictor.path(ids, context)  # [L, T, E]
    with torch.no_grad():
        expected = torch.sigmoid(net(ids, context)).transpose(0, 1)
    assert torch.equal(probs, expected)
    topk = traces.topk_ids[:50, 1].long()
    ahead = predictor.ahead(1, torch.empty(50, 64), ids, topk, horizon=5)
    assert torch.equal(ahead, probs[2:])  # clipped to the layers there are
    with pytest.raises(RuntimeError, match="path\\(\\) had 50"):
        predictor.ahead(1, torch.empty(3, 64), ids[:3], topk[:3], horizon=1)


@pytest.mark.parametrize("train", [train_rpp, train_hybrid])
def test_training_keeps_the_epoch_with_the_best_validation_recall(
    traces: TraceSet, train: Callable[..., tuple[RPPNet | HybridNet, FitReport]]
) -> None:
    fit, validation = traces.split(0.34, seed=1)
    net, report = train(fit, replace(FIT, epochs=5, lr=3e-2), validation)
    assert len(report.validation_recall) == 5
    best = max(report.validation_recall)
    assert report.epoch == report.validation_recall.index(best) + 1
    assert horizon_recall(net, validation) == pytest.approx(best, abs=1e-6)
    assert horizon_recall(net, validation) == pytest.approx(
        evaluate(fit, validation, net).by_horizon(net.kind, 1), abs=1e-6
    )


def test_a_tie_keeps_the_earlier_epoch(traces: TraceSet, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([0.5, 0.7, 0.7, 0.6])  # validation recall after epochs 1..4
    monkeypatch.setattr(train_module, "horizon_recall", lambda net, validation: next(scripted))
    net, report = train_rpp(traces, replace(FIT, epochs=4), validation=traces)
    assert report.epoch == 2 and report.validation_recall == [0.5, 0.7, 0.7, 0.6]
    two_epochs, _ = train_rpp(traces, replace(FIT, epochs=2))  # the same seed, stopped there
    state, expected = net.state_dict(), two_epochs.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_picking_the_epoch_needs_two_training_documents(traces: TraceSet, tmp_path: Path) -> None:
    path, out = tmp_path / "two-docs.safetensors", tmp_path / "rpp.safetensors"
    traces.select_documents(torch.tensor([0, 1])).save(path)  # 1 held out, 1 left to train on
    with pytest.raises(ValueError, match="at least 2 training documents.*--validation 0"):
        train_predictor("rpp", path, out, replace(FIT, epochs=1))
    train_predictor("rpp", path, out, replace(FIT, epochs=1, validation=0.0))
    assert read_predictor_header(out)["info"]["kept_epoch"] == 1


def test_hybrid_learns_and_round_trips(llm: LLM, traces: TraceSet, tmp_path: Path) -> None:
    net, _ = train_hybrid(traces, replace(FIT, epochs=4, batch_size=256))
    table = evaluate(traces, traces, net)
    for h in (1, 2):
        assert table.by_horizon("hybrid", h) > table.by_horizon("frequent", h) + 0.05
    path = tmp_path / "hybrid.safetensors"
    net.save(path, {"note": "test"})
    predictor = make_predictor("hybrid", llm.engine.model, path)
    assert predictor.path(traces.token_ids[:4], traces.context(0)[:4]) is None
    loaded = HybridNet.load(path)
    ids, topk = traces.token_ids[:40].long(), traces.topk_ids[:40, 0].long()
    guess = traces.pregate[:40, :3].float().transpose(0, 1)  # pairs (0,1), (0,2), (0,3): [3, T, E]
    assert torch.equal(loaded.correct(0, guess, ids, topk), net.correct(0, guess, ids, topk))


def test_make_predictor_validates(
    llm: LLM, traces: TraceSet, mixtral_checkpoint: Path, tmp_path: Path
) -> None:
    model = llm.engine.model
    assert make_predictor("none", model, None) is None
    assert isinstance(make_predictor("pregate", model, None), PreGatePredictor)
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("oracle", model, None)
    with pytest.raises(ValueError, match="needs a predictor path"):
        make_predictor("rpp", model, None)
    path = tmp_path / "rpp.safetensors"
    train_rpp(traces, replace(FIT, epochs=1))[0].save(path, {})
    with pytest.raises(ValueError, match="holds a 'rpp' predictor, not 'hybrid'"):
        make_predictor("hybrid", model, path)
    with pytest.raises(FileNotFoundError):
        make_predictor("rpp", model, tmp_path / "missing.safetensors")
    two_layers = LLM(model=str(mixtral_checkpoint), max_model_len=SEQ_LEN).engine.model
    with pytest.raises(ValueError, match="num_layers=4 \\(the model: 2\\)"):
        make_predictor("rpp", two_layers, path)


def test_pregate_one_layer_ahead_shapes(mixtral_checkpoint: Path) -> None:
    model = LLM(model=str(mixtral_checkpoint), max_model_len=SEQ_LEN).engine.model
    pregate = PreGatePredictor(model)
    residual, ids = torch.randn(5, 64), torch.arange(5)
    topk = torch.zeros(5, 2, dtype=torch.long)
    ahead = pregate.ahead(0, residual, ids, topk, horizon=3)  # clipped to the one layer after 0
    assert ahead.shape == (1, 5, 8)
    torch.testing.assert_close(ahead.sum(-1), torch.ones(1, 5))
    assert pregate.ahead(1, residual, ids, topk, horizon=1).shape == (0, 5, 8)


def _per_layer_pregate(model: MoECausalLM, residual: torch.Tensor, targets: range) -> torch.Tensor:
    """The pre-gate as each layer computes it: its norm, its router, its probabilities."""
    layers = [model.model.layers[i] for i in model.cfg.moe_layers]
    return torch.stack(
        [
            layers[j].ffn.gate.probabilities(
                layers[j].ffn.gate(layers[j].post_attention_layernorm(residual))[0]
            )
            for j in targets
        ]
    )  # [h, T, E]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_pregate_equals_each_layers_router(tiny_checkpoint: Path, dtype: str) -> None:
    """One batched GEMM over the layers ahead scores as each layer's own norm and router would,
    for every family's router (biases, corrections, float32 logits) and norm."""
    model = LLM(model=str(tiny_checkpoint), max_model_len=SEQ_LEN, dtype=dtype).engine.model
    hidden = model.cfg.hidden_size
    residual = torch.randn(5, hidden, generator=torch.Generator().manual_seed(0))
    residual = residual.to(model.model.embed_tokens.weight.dtype)
    ids, topk = torch.arange(5), torch.zeros(5, 2, dtype=torch.long)
    with torch.no_grad():  # norms that scale: checkpoints start them at one
        for layer in model.model.layers:
            weight = layer.post_attention_layernorm.weight
            weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) + 0.5)
    pregate = PreGatePredictor(model)
    expected = _per_layer_pregate(model, residual, range(1, pregate.num_layers))
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == "float32" else {"atol": 2e-2, "rtol": 0}
    torch.testing.assert_close(pregate.ahead(0, residual, ids, topk, 8), expected, **tolerance)


def test_stacked_pregate_reaches_several_layers_ahead() -> None:
    model = LLM(enable_prefix_caching=False).engine.model  # the demo model: 6 MoE layers
    residual = torch.randn(3, model.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    pregate = PreGatePredictor(model)
    ahead = pregate.ahead(1, residual, torch.arange(3), torch.zeros(3, 2, dtype=torch.long), 3)
    expected = _per_layer_pregate(model, residual, range(2, 5))
    torch.testing.assert_close(ahead, expected, atol=1e-5, rtol=1e-4)


def _run_cli(
    model: Path, corpus: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> str:
    traces, rpp, hybrid = (
        tmp_path / n for n in ("t.safetensors", "rpp.safetensors", "hy.safetensors")
    )
    assert (
        main(
            [
                "trace",
                "--model",
                str(model),
                "--corpus",
                *map(str, corpus),
                "--out",
                str(traces),
                "--max-tokens",
                str(MAX_TOKENS),
                "--seq-len",
                str(SEQ_LEN),
            ]
        )
        == 0
    )
    for kind, out in (("rpp", rpp), ("hybrid", hybrid)):
        assert (
            main(
                [
                    "train-predictor",
                    "--kind",
                    kind,
                    "--traces",
                    str(traces),
                    "--out",
                    str(out),
                    "--model",
                    str(model),
                    "--epochs",
                    "3",
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert main(["eval-predictor", "--traces", str(traces), "--kind", "pregate"]) == 0
    assert main(["eval-predictor", "--traces", str(traces), "--predictor", str(rpp)]) == 0
    assert (
        main(
            [
                "eval-predictor",
                "--traces",
                str(traces),
                "--predictor",
                str(hybrid),
                "--model",
                str(model),
            ]
        )
        == 0
    )
    return capsys.readouterr().out


def test_cli_trace_train_eval(
    deep_checkpoint: Path, corpus: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run_cli(deep_checkpoint, corpus, tmp_path, capsys)
    assert out.count("recall@2 on") == 3
    for column in (
        "frequent",
        "previous",
        "pregate@1",
        "pregate@2",
        "rpp@path",
        "hybrid@1",
        "hybrid@2",
    ):
        assert column in out
    rows = [line.split() for line in out.splitlines()]
    assert ["horizon", "frequent", "previous", "pregate", "hybrid"] in rows
    assert any(r[:1] == ["3"] and len(r) == 5 for r in rows)  # horizon 3 of 4 MoE layers
    # the same seed trains the same weights
    again = tmp_path / "again.safetensors"
    assert (
        main(
            [
                "train-predictor",
                "--kind",
                "rpp",
                "--traces",
                str(tmp_path / "t.safetensors"),
                "--out",
                str(again),
                "--epochs",
                "3",
            ]
        )
        == 0
    )
    first, second = load_file(tmp_path / "rpp.safetensors"), load_file(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    info = read_predictor_header(again)["info"]  # the epoch was picked on validation documents
    assert len(info["validation_recall"]) == 3 and 1 <= info["kept_epoch"] <= 3


def test_cli_errors_are_reported_not_raised(
    tmp_path: Path, deep_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert (
        main(
            [
                "trace",
                "--model",
                str(deep_checkpoint),
                "--corpus",
                str(tmp_path / "nope.txt"),
                "--out",
                str(tmp_path / "t.safetensors"),
            ]
        )
        == 2
    )
    assert main(["eval-predictor", "--traces", str(tmp_path / "nope.safetensors")]) == 2
    bad_flag = ["--traces", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "p")]
    assert main(["train-predictor", "--kind", "rpp", *bad_flag, "--validation", "1.5"]) == 2
    assert "validation=1.5 must be in [0, 1)" in caplog.text


@pytest.mark.skipif(
    not Path(DEFAULT_MODEL, "config.json").is_file(), reason="no demo model yet: make demo-model"
)
def test_cli_on_demo_model(
    corpus: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run_cli(Path(DEFAULT_MODEL), corpus, tmp_path, capsys)
    assert "rpp@path" in out and "hybrid@1" in out
    # A trained model routes non-randomly: one layer ahead, the traced pre-gate guess and the
    # hybrid's correction of it are far better than the layer's most frequent experts.
    traces = TraceSet.load(tmp_path / "t.safetensors")
    train, test = traces.split(TrainConfig.holdout, TrainConfig.seed)  # what the CLI trained with
    table = evaluate(train, test, HybridNet.load(tmp_path / "hy.safetensors"))
    frequent = table.by_horizon("frequent", 1)
    assert table.by_horizon("pregate", 1) > frequent + 0.1
    assert table.by_horizon("hybrid", 1) > frequent + 0.1
