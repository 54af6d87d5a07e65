"""`expertflow trace`: record routing traces of a model over a text corpus, the training and
evaluation data of `train-predictor` and `eval-predictor`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from safetensors import SafetensorError

from engine import LLM, ConfigError
from engine.config import DEFAULT_MODEL, DTYPES
from engine.offload.predict.trace import record_traces
from engine.offload.predict.train import MIN_DOCUMENTS
from server.commands import Command
from server.commands.outputs import prepare_out

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face checkpoint folder")
    parser.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        type=Path,
        help="UTF-8 text files; each is one document (held-out splits never cut a document)",
    )
    parser.add_argument("--out", required=True, type=Path, help="trace file to write (safetensors)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="trace this many tokens at most, shared evenly over the files (default: all)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=256,
        help="tokens per prefill sequence (documents are chunked)",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="model dtype; auto: as serve picks it (float32 on the CPU, the checkpoint's 16-bit "
        "dtype on CUDA), so the traced routes are the ones serving will take",
    )


def run(args: argparse.Namespace) -> int:
    missing = [str(f) for f in args.corpus if not f.is_file()]
    if missing:
        logger.error("corpus files not found: %s", ", ".join(missing))
        return 2
    if args.seq_len < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        logger.error("--seq-len and --max-tokens must be >= 1")
        return 2
    try:
        prepare_out(args.out, list(args.corpus))
        llm = LLM(
            model=args.model, max_model_len=args.seq_len, device=args.device, dtype=args.dtype
        )
        traces = record_traces(llm, list(args.corpus), args.seq_len, args.max_tokens)
        traces.save(args.out)
    except (ConfigError, ValueError, OSError, SafetensorError) as exc:  # a full disk
        logger.error("%s", exc)
        return 2
    logger.info("wrote %d tokens of routing to %s", len(traces), args.out)
    if len(traces.meta.documents) < MIN_DOCUMENTS:
        logger.warning(
            "traced %d documents, and train-predictor needs %d (one corpus file is one document: "
            "one held out, one to pick the epoch, the rest to train on): trace more files",
            len(traces.meta.documents),
            MIN_DOCUMENTS,
        )
    return 0


COMMAND = Command(
    name="trace",
    help="record which experts a model routes each token of a text corpus to (for train-predictor)",
    add_arguments=add_arguments,
    run=run,
)
