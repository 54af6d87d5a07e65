"""`expertflow serve` flags: generated from EngineConfig, merged with --config YAML, checked early."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from engine import EngineConfig
from server.chat_template import ChatTemplateError, load_chat_template
from server.cli import build_parser, main, parse_args
from server.config_args import add_config_args, config_from_args
from server.config_file import ConfigFileError, config_file_tokens


def test_every_engine_field_is_a_flag_with_its_default() -> None:
    args = parse_args(["serve"])
    assert config_from_args(EngineConfig, args) == EngineConfig()
    parsed = parse_args(
        ["serve", "--max-num-seqs", "8", "--dtype", "bfloat16", "--max-model-len", "64"]
    )
    config = config_from_args(EngineConfig, parsed)
    assert (config.max_num_seqs, config.dtype, config.max_model_len) == (8, "bfloat16", 64)


@pytest.mark.parametrize("argv", [["--dtype", "int8"], ["--max-num-seqs", "many"], ["--nope", "1"]])
def test_bad_flags_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", *argv])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    horizon: int | str = dataclasses.field(default="auto", metadata={"help": "N or auto"})
    fast: bool = dataclasses.field(default=False, metadata={"help": "go fast"})
    ratio: float | None = dataclasses.field(default=None, metadata={"help": "a ratio"})
    policy: str = dataclasses.field(
        default="lru", metadata={"help": "p", "choices": ("lru", "lfu")}
    )


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_args(parser, ToyConfig, "toy")
    return parser


def test_field_types_become_flag_types() -> None:
    parse = toy_parser().parse_args
    assert config_from_args(ToyConfig, parse([])) == ToyConfig()
    config = config_from_args(
        ToyConfig, parse(["--horizon", "3", "--fast", "--ratio", "0.5", "--policy", "lfu"])
    )
    assert config == ToyConfig(horizon=3, fast=True, ratio=0.5, policy="lfu")
    assert parse(["--horizon", "auto", "--no-fast"]).horizon == "auto"
    with pytest.raises(argparse.ArgumentError):
        parse(["--policy", "fifo"])


def test_unsupported_field_type_is_named() -> None:
    @dataclasses.dataclass
    class Bad:
        layers: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match=r"Bad\.layers"):
        add_config_args(argparse.ArgumentParser(), Bad, "bad")


def test_config_file_values_and_command_line_override(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "max_num_seqs: 8\ndtype: bfloat16\nserved_model_name: from-yaml\nport: 9000\n"
    )
    args = parse_args(["serve", "--config", str(config), "--max-num-seqs", "4"])
    assert (args.max_num_seqs, args.dtype, args.served_model_name, args.port) == (
        4, "bfloat16", "from-yaml", 9000,
    )  # fmt: skip


def test_config_file_value_may_start_with_a_dash(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text('served_model_name: "-my-model"\n')
    assert parse_args(["serve", "--config", str(config)]).served_model_name == "-my-model"


def test_config_file_values_are_the_text_as_written(tmp_path: Path) -> None:
    """As on the command line: YAML would read 0123 as octal 83 and yes as True."""
    config = tmp_path / "serve.yaml"
    config.write_text("api_key: 0123\nserved_model_name: yes\nmax_num_seqs: 010\nport: null\n")
    args = parse_args(["serve", "--config", str(config)])
    assert (args.api_key, args.served_model_name, args.max_num_seqs, args.port) == (
        "0123", "yes", 10, 8000,
    )  # fmt: skip


def test_config_file_booleans(tmp_path: Path) -> None:
    parser = toy_parser()
    config = tmp_path / "toy.yaml"
    config.write_text("fast: true\nhorizon: 2\nratio: null\n")
    assert config_file_tokens(parser, str(config)) == ["--fast", "--horizon=2"]
    config.write_text("fast: false\n")
    assert config_file_tokens(parser, str(config)) == ["--no-fast"]
    config.write_text("fast: yes please\n")
    with pytest.raises(ConfigFileError, match="true or false"):
        config_file_tokens(parser, str(config))
    parser.add_argument("--verbose", action="store_true")  # no --no- form
    config.write_text("verbose: true\n")
    assert config_file_tokens(parser, str(config)) == ["--verbose"]
    config.write_text("verbose: false\n")
    assert config_file_tokens(parser, str(config)) == []
    config.write_text("verbose: 1\n")
    with pytest.raises(ConfigFileError, match="true or false"):
        config_file_tokens(parser, str(config))


@pytest.mark.parametrize(
    ("argv", "text", "wanted"),
    [
        (["trace"], "corpus: a.txt\nout: t.st\n", {"corpus": [Path("a.txt")], "out": Path("t.st")}),
        (["train-predictor"], "kind: rpp\ntraces: t.st\nout: p.st\n", {"kind": "rpp"}),
        (["quantize-fp8", "--out", "cli"], "model: m\nout: o\n", {"model": Path("m"), "out": Path("cli")}),
    ],
)  # fmt: skip
def test_config_file_supplies_required_flags(
    tmp_path: Path, argv: list[str], text: str, wanted: dict[str, object]
) -> None:
    config = tmp_path / "command.yaml"
    config.write_text(text)
    for flag in ("--config", "--conf"):  # an abbreviation argparse accepts finds the file too
        args = parse_args([*argv, flag, str(config)])
        assert {name: getattr(args, name) for name in wanted} == wanted


def test_config_file_lists_for_flags_of_several_values(tmp_path: Path) -> None:
    config = tmp_path / "command.yaml"
    config.write_text("corpus: [a.txt, b.txt]\nout: t.st\n")
    assert parse_args(["trace", "--config", str(config)]).corpus == [Path("a.txt"), Path("b.txt")]
    args = parse_args(["trace", "--config", str(config), "--corpus", "c.txt"])
    assert args.corpus == [Path("c.txt")]  # the command line's list replaces the file's
    config.write_text("corpus: [a.txt, -b.txt]\nout: t.st\n")
    with pytest.raises(ConfigFileError, match="cannot start with '-'"):
        config_file_tokens(build_parser()[1]["trace"], str(config))
    config.write_text("model: m\nout: o\nblock: [64, 32]\n")
    assert parse_args(["quantize-fp8", "--config", str(config)]).block == [64, 32]
    for block, words in [("64", "takes 2 values, got 1"), ("[64, x]", "invalid int value: 'x'")]:
        config.write_text(f"model: m\nout: o\nblock: {block}\n")
        with pytest.raises(ConfigFileError, match=words):
            config_file_tokens(build_parser()[1]["quantize-fp8"], str(config))


def test_stray_word_is_not_a_config_file_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "trace.yaml"
    config.write_text("out: t.st\ncorpus: a.txt\n")  # a list last, which takes any word after it
    with pytest.raises(SystemExit):
        parse_args(["trace", "b.txt", "--config", str(config)])
    assert "unrecognized arguments: b.txt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_num_sequences: 8\n", "unknown key 'max_num_sequences'"),
        ("dtype: int8\n", "bad.yaml: dtype: invalid choice: 'int8'"),
        ("max_num_seqs: abc\n", "bad.yaml: max_num_seqs: invalid int value: 'abc'"),
        ("- 1\n- 2\n", "mapping"),
        ("max_num_seqs: [1, 2]\n", "one value"),
        ("max_num_seqs: 8\n  bad: indent\n", "bad.yaml: line 2, column 6: mapping values"),
        ("a: [\n", "bad.yaml: line 2, column 1: expected the node content"),
        ("max_num_seqs: 8\nmax_num_seqs: 4\n", "'max_num_seqs' sets the same flag as"),
        ("max_num_seqs: 8\nmax-num-seqs: 4\n", "'max-num-seqs' sets the same flag as 'max_num"),
        ("max_num_seqs: \xff8\n".encode("latin-1"), "bad.yaml: 'utf-8' codec can't decode"),
    ],
)
def test_config_file_errors(
    tmp_path: Path, text: str | bytes, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line naming the file: a YAML error's own message spans lines and quotes the text, a
    file that is not UTF-8 raised UnicodeDecodeError, and a key given twice (or spelled both
    ways) kept its last value silently."""
    config = tmp_path / "bad.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", "--config", str(config)])
    assert exc.value.code == 2 and words in capsys.readouterr().err.splitlines()[-1]


def test_chat_template_file_or_inline(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template
    assert load_chat_template(template) == template
    assert load_chat_template(None) is None
    with pytest.raises(ChatTemplateError, match="no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_serve_refuses_a_folder_without_checkpoint(tmp_path: Path) -> None:
    assert main(["serve", "--model", str(tmp_path), "--log-level", "error"]) == 2


def test_readme_table_lists_every_serve_flag() -> None:
    """The README's flag table is written by hand; this keeps it in step with the parser."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("<!-- server:start -->") : readme.index("<!-- server:end -->")]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `--")]
    documented = {flag for row in rows for flag in re.findall(r"--[a-z0-9-]+", row)}
    _, parsers = build_parser()
    flags = {s for a in parsers["serve"]._actions for s in a.option_strings if s.startswith("--")}
    assert documented == flags - {"--help"}
