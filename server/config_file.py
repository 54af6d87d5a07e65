"""`--config X.yaml`: a file of flag values (keys are flag names with underscores). Its entries are
turned back into command-line tokens placed before the user's own flags, so argparse checks them
exactly like typed flags (types, choices) and a flag on the command line overrides the file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

NOT_IN_FILE = frozenset({"help", "config"})


class ConfigFileError(ValueError):
    pass


def config_file_tokens(parser: argparse.ArgumentParser, path: str) -> list[str]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"--config {path}: {exc}") from exc
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_IN_FILE}
    tokens: list[str] = []
    for key, value in data.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise ConfigFileError(
                f"--config {path}: unknown key {key!r} (keys are flag names with underscores, "
                f"e.g. {next(iter(actions), 'max_num_seqs')})"
            )
        tokens += _tokens(parser, action, value, f"--config {path}: {key}")
    return tokens


def _tokens(
    parser: argparse.ArgumentParser, action: argparse.Action, value: Any, where: str
) -> list[str]:
    flag = action.option_strings[0]
    switch = isinstance(action, argparse.BooleanOptionalAction)
    if (switch or action.nargs == 0) and not isinstance(value, bool):  # store_true / _false too
        raise ConfigFileError(f"{where} must be true or false, got {value!r}")
    if switch:
        return [flag] if value else [f"--no-{flag.removeprefix('--')}"]
    if action.nargs == 0:  # a flag without --no- form: given when the file asks for its value
        return [flag] if value == action.const else []
    if value is None:  # an explicit null keeps the flag's default
        return []
    if isinstance(value, dict | list):
        raise ConfigFileError(f"{where} takes one value, got {value!r}")
    _check(parser, action, [str(value)], where)
    return [f"{flag}={value}"]  # one token, so that a value such as "-my-model" is not a flag


def _check(
    parser: argparse.ArgumentParser, action: argparse.Action, texts: list[str], where: str
) -> None:
    """argparse's own conversion (type, choices), run here so that an error names the file and
    the key instead of a flag the user never typed."""
    try:
        parser._get_values(action, list(texts))
    except argparse.ArgumentError as exc:
        raise ConfigFileError(f"{where}: {exc.message}") from exc
