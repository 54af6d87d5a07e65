"""`expertflow train-predictor`: train an RPP (EF-24) or hybrid (EF-25) predictor on traces."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from engine import ConfigError, ModelConfig
from engine.offload.predict.train import HIDDEN_DIM, TrainConfig, train_predictor
from server.commands import Command

logger = logging.getLogger(__name__)
DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind", required=True, choices=("rpp", "hybrid"), help="predictor to train"
    )
    parser.add_argument("--traces", required=True, type=Path, help="file from `expertflow trace`")
    parser.add_argument("--out", required=True, type=Path, help="predictor file to write")
    parser.add_argument(
        "--model", help="checkpoint the predictor is for; checked against the traces' dims"
    )
    group = parser.add_argument_group("training")
    group.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS.epochs,
        help="passes over the data at most (the best by validation recall is kept)",
    )
    group.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="samples per step"
    )
    group.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate")
    group.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help="init, shuffling and split seed"
    )
    group.add_argument(
        "--holdout",
        type=float,
        default=DEFAULTS.holdout,
        help="fraction of documents held out for eval-predictor",
    )
    group.add_argument(
        "--validation",
        type=float,
        default=DEFAULTS.validation,
        help="fraction of the training documents that picks the epoch (0: keep the last)",
    )
    group.add_argument(
        "--embed-dim", type=int, default=DEFAULTS.embed_dim, help="token embedding size"
    )
    group.add_argument(
        "--hidden-dim",
        type=int,
        default=DEFAULTS.hidden_dim,
        help="MLP hidden size (default: "
        + ", ".join(f"{size} for {kind}" for kind, size in HIDDEN_DIM.items())
        + ")",
    )
    group.add_argument(
        "--context-window",
        type=int,
        default=DEFAULTS.context_window,
        help="rpp: previous token ids it sees",
    )
    group.add_argument(
        "--layer-dim",
        type=int,
        default=DEFAULTS.layer_dim,
        help="hybrid: size of the source-layer and distance embeddings",
    )
    group.add_argument(
        "--max-token-rows",
        type=int,
        default=DEFAULTS.max_token_rows,
        help="token embedding rows at most (the most frequent training tokens get one)",
    )


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        holdout=args.holdout,
        validation=args.validation,
        embed_dim=args.embed_dim,
        hidden_dim=args.hidden_dim,
        context_window=args.context_window,
        layer_dim=args.layer_dim,
        max_token_rows=args.max_token_rows,
    )
    try:
        model = ModelConfig.from_pretrained(args.model) if args.model else None
        train_predictor(args.kind, args.traces, args.out, cfg, model)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


COMMAND = Command(
    name="train-predictor",
    help="train a routing predictor (rpp or hybrid) on traces from `expertflow trace`",
    add_arguments=add_arguments,
    run=run,
)
