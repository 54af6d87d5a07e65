"""`expertflow quantize-fp8`: a block-wise FP8 copy of a checkpoint (engine/quantize.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from safetensors import SafetensorError

from engine import ConfigError
from engine.quantize import quantize_checkpoint
from server.commands import Command

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder to quantize")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the FP8 copy")
    parser.add_argument(
        "--block",
        type=int,
        nargs=2,
        default=(128, 128),
        metavar=("ROWS", "COLS"),
        help="weights sharing one scale (DeepSeek-V3 and Qwen3 -FP8 use 128 128)",
    )


def run(args: argparse.Namespace) -> int:
    if min(args.block) < 1:
        logger.error("--block sizes must be positive")
        return 2
    try:
        quantize_checkpoint(args.model, args.out, tuple(args.block))
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    except (OSError, SafetensorError) as exc:  # an --out that cannot be made, an unreadable shard
        logger.error("copying --model %s to --out %s: %s", args.model, args.out, exc)
        return 2
    return 0


COMMAND = Command(
    "quantize-fp8",
    "write a block-wise FP8 copy of a checkpoint: its experts then move half of bfloat16's bytes",
    add_arguments,
    run,
)
