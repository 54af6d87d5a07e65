"""`expertflow eval-predictor`: recall@k of a routing predictor on held-out traces, per MoE layer
and per horizon, next to the previous-token and most-frequent baselines and the pre-gate."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine import ConfigError, ModelConfig
from engine.offload.predict.evaluate import evaluate
from engine.offload.predict.files import reading
from engine.offload.predict.hybrid import HybridNet
from engine.offload.predict.rpp import RPPNet, check_dims, model_dims, read_predictor_header
from engine.offload.predict.trace import TraceSet
from engine.offload.predict.train import TrainConfig
from server.commands import Command

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", required=True, type=Path, help="file from `expertflow trace`")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--predictor", type=Path, help="file from `expertflow train-predictor`")
    which.add_argument(
        "--kind",
        choices=("pregate",),
        help="an untrained predictor to evaluate (the baselines and pregate are always shown)",
    )
    parser.add_argument("--model", help="checkpoint the traces must be of (default: no check)")
    parser.add_argument(
        "--holdout",
        type=float,
        help="fraction of documents held out (default: the predictor's training split, else "
        f"{TrainConfig.holdout})",
    )
    parser.add_argument(
        "--seed", type=int, help=f"split seed (default: the predictor's, else {TrainConfig.seed})"
    )


def run(args: argparse.Namespace) -> int:
    try:
        traces = TraceSet.load(args.traces)
        if args.model:
            model = ModelConfig.from_pretrained(args.model)
            check_dims(f"trace {args.traces}", traces.meta.dims, model_dims(model), args.model)
        predictor: RPPNet | HybridNet | None = None
        holdout, seed = TrainConfig.holdout, TrainConfig.seed
        if args.predictor is not None:
            header = read_predictor_header(args.predictor)
            with reading(args.predictor, "predictor"):
                training = header["info"]["training"]
                holdout, seed = float(training["holdout"]), int(training["seed"])
            loader = HybridNet if header.get("kind") == "hybrid" else RPPNet
            predictor = loader.load(args.predictor)  # refuses a kind that is neither
        train, test = traces.split(
            holdout if args.holdout is None else args.holdout,
            seed if args.seed is None else args.seed,
        )
        table = evaluate(train, test, predictor)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    print(table.format())
    return 0


COMMAND = Command(
    name="eval-predictor",
    help="recall@k of a routing predictor on held-out traces, per layer and horizon, vs baselines",
    add_arguments=add_arguments,
    run=run,
)
