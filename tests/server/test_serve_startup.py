"""`expertflow serve` refuses what it cannot load before it binds its port: one line naming the
problem and exit status 2, not a traceback from the app's startup."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from server.cli import main
from server.shutdown import DrainingServer


@pytest.mark.parametrize(
    "flags",
    [
        ["--predictor", "rpp", "--predictor-path", "{missing}"],
        ["--predictor", "rpp", "--predictor-path", "{text}"],
        ["--tokenizer", "{missing}"],
        ["--tokenizer", "{folder}"],  # no tokenizer files: transformers' message spans lines
        ["--tokenizer", "{text}"],  # not a folder: was looked up on the Hub as a repo id
        ["--chat-template", "{% if %}"],
        ["--max-model-len", "100000"],
        ["--max-model-len", "0"],
        ["--block-size", "1024"],  # past the model's 512 tokens: was accepted silently
        ["--predictor-path", "{text}"],  # read by no predictor but rpp and hybrid
        ["--cache-aware-routing-margin", "nan"],  # compared false: routing silently off
        ["--link-gbps", "nan"],  # compared false: no delay, logged as an emulated link
        ["--link-gbps", "inf"],
        ["--max-defer-steps", "-1"],  # was checked only with a token group
    ],
    ids=[
        "missing-predictor",
        "text-as-predictor",
        "missing-tokenizer",
        "folder-without-tokenizer",
        "file-as-tokenizer",
        "bad-template",
        "too-long",
        "zero-length",
        "block-past-context",
        "unread-predictor-path",
        "nan-margin",
        "nan-link",
        "inf-link",
        "negative-defer",
    ],
)
def test_what_cannot_load_is_one_line_and_status_2(
    flags: list[str],
    mixtral_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def started(self: DrainingServer) -> None:
        raise AssertionError("it started serving")

    monkeypatch.setattr(DrainingServer, "run", started)
    text = tmp_path / "notes.txt"
    text.write_text("not a predictor")
    (tmp_path / "folder").mkdir()
    paths = {"{missing}": str(tmp_path / "missing"), "{text}": str(text)}
    paths["{folder}"] = str(tmp_path / "folder")
    argv = ["serve", "--model", str(mixtral_checkpoint), "--port", "0"]
    argv += [paths.get(f, f) for f in flags]
    assert main(argv) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None and "\n" not in errors[0].getMessage()


def test_a_port_out_of_range_is_refused_before_loading(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "99999"])
    assert exc.value.code == 2 and "99999 is not a port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--graceful-shutdown-timeout", "inf"],  # crashed DrainingServer's int() at startup
        ["--graceful-shutdown-timeout", "nan"],
        ["--request-timeout", "inf"],
    ],
)
def test_time_limits_are_finite(
    flags: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def started(self: DrainingServer) -> None:
        raise AssertionError("it started serving")

    monkeypatch.setattr(DrainingServer, "run", started)
    with pytest.raises(SystemExit) as exc:
        main(["serve", *flags])
    error = capsys.readouterr().err.splitlines()[-1]
    assert exc.value.code == 2 and f"argument {flags[0]}: must be a finite number" in error


@pytest.mark.parametrize("host", ["127.0.0.1", "no-such-host.invalid"])
def test_an_address_it_cannot_listen_on_is_refused_before_loading(
    host: str, mixtral_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A port in use or a host that does not resolve failed in uvicorn's words, naming no flag,
    with exit 3, and only once the model had loaded."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert (
            main(["serve", "--model", str(mixtral_checkpoint), "--host", host, "--port", port]) == 2
        )
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"--host {host} --port {port}: cannot listen there" in errors[0]
    assert "engine.loader" not in {r.name for r in caplog.records}
