"""engine/progress.py: bars in a log are lines, not carriage-return redraws."""

from __future__ import annotations

import io

import pytest

from engine import progress as progress_module
from engine.progress import progress


def test_a_bar_in_a_log_writes_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)  # every update drawn
    assert sum(progress(range(5), desc="loading", miniters=1)) == 10
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and all(line.endswith("\n") for line in lines)
    assert lines[0].startswith("loading:   0%") and "5/5" in lines[-1]
    assert len(lines) >= 3


def test_a_log_gets_a_line_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    for _ in progress(range(10_000), desc="tracing"):
        pass
    assert len(log.getvalue().splitlines()) == 2  # the start and the end, well within 30 s


def test_a_cleared_bar_leaves_nothing_but_its_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    for _ in progress(range(3), desc="loading", leave=False):
        pass
    assert log.getvalue().count("\n") == len(log.getvalue().splitlines()) >= 1
    assert "\r" not in log.getvalue()
