"""`expertflow eval-predictor`: recall@k of a routing predictor on held-out traces, per MoE layer
and per horizon, next to the previous-token and most-frequent baselines and the pre-gate."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine import ConfigError, ModelConfig
from engine.offload.predict.documents import TrainedDocuments
from engine.offload.predict.evaluate import evaluate
from engine.offload.predict.hybrid import HybridNet
from engine.offload.predict.rpp import (
    RPPNet,
    check_dims,
    model_dims,
    read_predictor_header,
    warn_if_other_model,
)
from engine.offload.predict.trace import TraceSet
from engine.offload.predict.train import TrainConfig
from server.commands import Command

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", required=True, type=Path, help="file from `expertflow trace`")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--predictor",
        type=Path,
        help="file from `expertflow train-predictor`; scored only on the documents of the traces "
        "it was not trained on",
    )
    which.add_argument(
        "--kind",
        choices=("pregate",),
        help="an untrained predictor to evaluate (the baselines and pregate are always shown)",
    )
    parser.add_argument("--model", help="checkpoint the traces must be of (default: no check)")
    parser.add_argument(
        "--holdout",
        type=float,
        default=TrainConfig.holdout,
        help="fraction of documents held out, when there are no trained ones to count the "
        "baselines on (no --predictor, or traces of other text than it was trained on)",
    )
    parser.add_argument(
        "--seed", type=int, default=TrainConfig.seed, help="split seed, with --holdout"
    )


def run(args: argparse.Namespace) -> int:
    try:
        traces = TraceSet.load(args.traces)
        if args.model:
            model = ModelConfig.from_pretrained(args.model)
            check_dims(f"trace {args.traces}", traces.meta.dims, model_dims(model), args.model)
            warn_if_other_model(f"trace {args.traces}", traces.meta.model, args.model)
        if args.predictor is None:
            predictor = None
            train, test = traces.split(args.holdout, args.seed)
        else:
            predictor, train, test = _unseen(args.predictor, traces, args.holdout, args.seed)
        table = evaluate(train, test, predictor)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    print(table.format())
    return 0


def _unseen(
    path: Path, traces: TraceSet, holdout: float, seed: int
) -> tuple[RPPNet | HybridNet, TraceSet, TraceSet]:
    """(predictor, baselines' documents, test documents): the test holds only documents the
    predictor was not trained on; the baselines count on those it was, or, in traces of other
    text, on a split of the rest."""
    header = read_predictor_header(path)
    trained = TrainedDocuments.from_info(header["info"], path)
    loader = HybridNet if header.get("kind") == "hybrid" else RPPNet
    predictor = loader.load(path)  # refuses a kind that is neither
    warn_if_other_model(f"predictor {path}", header["info"].get("model"), traces.meta.model)
    seen, unseen = trained.split(traces)
    if len(unseen) == 0:
        raise ValueError(
            f"{path} was trained on every document of the traces: trace other text "
            "to evaluate it on"
        )
    train, test = (seen, unseen) if len(seen) else unseen.split(holdout, seed)
    logger.info(
        "evaluating on %d documents (%d tokens) %s was not trained on; left out: %d it was",
        int(test.doc_ids.unique().numel()),
        len(test),
        path,
        int(seen.doc_ids.unique().numel()),
    )
    return predictor, train, test


COMMAND = Command(
    name="eval-predictor",
    help="recall@k of a routing predictor on held-out traces, per layer and horizon, vs baselines",
    add_arguments=add_arguments,
    run=run,
)
