"""`expertflow train-predictor`: train an RPP (EF-24) or hybrid (EF-25) predictor on traces."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from safetensors import SafetensorError

from engine import ConfigError
from engine.offload.predict.train import TrainConfig, train_predictor
from server.commands import Command
from server.commands.outputs import prepare_out
from server.config_args import add_config_args, config_from_args

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kind", required=True, choices=("rpp", "hybrid"), help="predictor to train"
    )
    parser.add_argument("--traces", required=True, type=Path, help="file from `expertflow trace`")
    parser.add_argument("--out", required=True, type=Path, help="predictor file to write")
    parser.add_argument(
        "--model", help="checkpoint the predictor is for; checked against the traces' dims"
    )
    add_config_args(parser, TrainConfig, "training")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(TrainConfig, args)
        prepare_out(args.out, [args.traces])
        train_predictor(args.kind, args.traces, args.out, cfg, args.model)
    except (ConfigError, ValueError, OSError, SafetensorError) as exc:  # a full disk
        logger.error("%s", exc)
        return 2
    return 0


COMMAND = Command(
    name="train-predictor",
    help="train a routing predictor (rpp or hybrid) on traces from `expertflow trace`",
    add_arguments=add_arguments,
    run=run,
)
