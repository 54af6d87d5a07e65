"""Reading trace and predictor files (safetensors with a JSON header) so that a truncated, corrupt
or hand-edited one is refused in a line that names it, not with a traceback from deep inside."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# What reading a damaged file raises: safetensors' parser, a bad JSON header, a header missing a
# key or with a wrong type, weights that do not fit the header's config.
DAMAGED = (
    SafetensorError,
    OSError,
    json.JSONDecodeError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    RuntimeError,
)


@contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Turn what a damaged `what` file raises while read into one ValueError naming the file."""
    try:
        yield
    except DAMAGED as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
        raise ValueError(f"{path} is not a readable {what} file ({reason})") from exc


def read_header(
    path: str | Path, what: str, key: str, version: int, make_one: str, fix: str
) -> dict:
    """The JSON header that a `what` file of format `version` keeps under metadata `key`, or a
    ValueError naming the file (FileNotFoundError if it is missing). `make_one` says how to
    produce such a file, `fix` what to do about an older format."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist ({make_one})")
    with reading(path, what), safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(key)
        if raw is None:
            raise ValueError(f"{path}: not a {what} file (no {key!r} metadata)")
        header = json.loads(raw)
        if not isinstance(header, dict) or header.get("format") != version:
            raise ValueError(f"{path}: {what} format is not {version}; {fix}")
    return header


def check_tensors(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    wanted: dict[str, tuple[tuple[int, ...], torch.dtype, int | None]],
    fix: str,
) -> None:
    """Each tensor of the shape and dtype its header implies, and its values in [0, bound), so a
    damaged file fails here and not as an index error in the middle of training."""
    for name, (shape, dtype, bound) in wanted.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(
                f"{path}: {name} is {t.dtype} {list(t.shape)}, its header says {dtype} "
                f"{list(shape)}; {fix}"
            )
        if bound is not None and t.numel() and not 0 <= int(t.min()) <= int(t.max()) < bound:
            raise ValueError(f"{path}: {name} holds values outside [0, {bound}); {fix}")
