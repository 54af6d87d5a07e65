"""Progress bars (tqdm) that read well in a log too. On a terminal: tqdm's bar, redrawn in place.
Elsewhere (docker logs, CI, a file): one line per update, at most every `LOG_INTERVAL_S`,
instead of a carriage-return redraw ten times a second that a log shows as one endless line."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
T = TypeVar("T")


class _Lines:
    """The stream tqdm draws on, turning each redraw ("\\r" + text + padding) into a line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:  # a cleared bar (leave=False) or a bare newline writes nothing
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm[T]:
    """`tqdm(iterable, **kwargs)` on the standard error, in lines when that is not a terminal."""
    stream = sys.stderr
    if not stream.isatty():
        kwargs = {"file": _Lines(stream), "mininterval": LOG_INTERVAL_S, **kwargs}
    return tqdm(iterable, **kwargs)
