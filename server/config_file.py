"""`--config X.yaml`: a file of flag values (keys are flag names with underscores). Its entries are
turned back into command-line tokens placed before the user's own flags, so argparse checks them
exactly like typed flags (types, choices) and a flag on the command line overrides the file. A value
is the text as written, as the command line would read it: YAML's own typing would turn
`api_key: 0123` into 83 and `served_model_name: yes` into True. A flag of several values (nargs)
takes a YAML list."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor

NOT_IN_FILE = frozenset({"help", "config"})
NULL, BOOL = "tag:yaml.org,2002:null", "tag:yaml.org,2002:bool"


class ConfigFileError(ValueError):
    pass


def config_file_tokens(parser: argparse.ArgumentParser, path: str) -> list[str]:
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"--config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"--config {path}: {_one_line(exc)}") from exc
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ConfigFileError(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_IN_FILE}
    tokens: list[str] = []
    seen: dict[str, str] = {}
    for key_node, node in root.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
        action = actions.get(key.replace("-", "_"))
        if action is None:
            raise ConfigFileError(
                f"--config {path}: unknown key {key!r} (keys are flag names with underscores, "
                f"e.g. {next(iter(actions), 'max_num_seqs')})"
            )
        if action.dest in seen:  # YAML keeps the last silently; max-num-seqs too is max_num_seqs
            raise ConfigFileError(
                f"--config {path}: {key!r} sets the same flag as {seen[action.dest]!r} before it"
            )
        seen[action.dest] = key
        tokens += _tokens(parser, action, node, f"--config {path}: {key}")
    return tokens


def _tokens(
    parser: argparse.ArgumentParser, action: argparse.Action, node: yaml.Node, where: str
) -> list[str]:
    flag = action.option_strings[0]
    switch = isinstance(action, argparse.BooleanOptionalAction)
    if switch or action.nargs == 0:  # store_true / _false too
        if node.tag != BOOL:
            raise ConfigFileError(f"{where} must be true or false, got {_shown(node)}")
        value = SafeConstructor.bool_values[node.value.lower()]
        if switch:
            return [flag] if value else [f"--no-{flag.removeprefix('--')}"]
        return [flag] if value == action.const else []  # no --no- form: given for its value only
    if node.tag == NULL:  # an explicit null keeps the flag's default
        return []
    texts = _texts(action, node, where)
    _check(parser, action, texts, where)
    if action.nargs is None:  # one token, so that a value such as "-my-model" is not a flag
        return [f"{flag}={texts[0]}"]
    if any(text.startswith("-") for text in texts):
        raise ConfigFileError(
            f"{where}: list items cannot start with '-' (they would read as flags)"
        )
    return [flag, *texts]


def _texts(action: argparse.Action, node: yaml.Node, where: str) -> list[str]:
    """One text per value: the scalar, or a list's items for a flag that takes several (nargs)."""
    several = action.nargs is not None
    items = node.value if several and isinstance(node, yaml.SequenceNode) else [node]
    if not all(isinstance(item, yaml.ScalarNode) and item.tag != NULL for item in items):
        wanted = "a value or a list of values" if several else "one value"
        raise ConfigFileError(f"{where} takes {wanted}, got {_shown(node)}")
    if (isinstance(action.nargs, int) and len(items) != action.nargs) or (
        action.nargs == "+" and not items
    ):
        count = "one or more" if action.nargs == "+" else action.nargs
        raise ConfigFileError(f"{where} takes {count} values, got {len(items)}")
    return [item.value for item in items]


def _check(
    parser: argparse.ArgumentParser, action: argparse.Action, texts: list[str], where: str
) -> None:
    """argparse's own conversion (type, choices), run here so that an error names the file and
    the key instead of a flag the user never typed."""
    try:
        parser._get_values(action, list(texts))
    except argparse.ArgumentError as exc:
        raise ConfigFileError(f"{where}: {exc.message}") from exc


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message spans lines and quotes the text; the problem and where it is suffice."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return " ".join(str(exc).split())


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return repr(node.value)
    return "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
