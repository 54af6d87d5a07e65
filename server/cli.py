"""`expertflow <command> [flags]`: argparse subcommands from the registry in server.commands. Every
command gets `--config X.yaml` and `--log-level`."""

from __future__ import annotations

import argparse
import logging
import sys

from server.commands import all_commands
from server.config_file import ConfigFileError, config_file_tokens

LOG_LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default unless it has none or its help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="expertflow", description="Serve Mixture-of-Experts LLMs with offloaded experts."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for command in all_commands():
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=HelpFormatter,
        )
        sub.add_argument(
            "--config",
            help="YAML file of flag values (keys: flag names with underscores); flags given on the command line win",
        )
        sub.add_argument(
            "--log-level", default="info", choices=LOG_LEVELS, help="logging verbosity"
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
        parsers[command.name] = sub
    return parser, parsers


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The --config file's values go in after the command name, before the user's own flags, so that
    argparse counts them like typed flags (required ones too) and the command line overrides them."""
    parser, parsers = build_parser()
    at = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    sub = parsers.get(argv[at]) if at < len(argv) else None
    rest = argv[at + 1 :]
    path = _config_path(sub, rest) if sub is not None else None
    if sub is None or path is None:
        return parser.parse_args(argv)
    try:
        tokens = config_file_tokens(sub, path)
    except ConfigFileError as exc:
        sub.error(str(exc))
    # before the user's first flag, so that no stray word becomes a value of the file's last flag
    first_flag = next((i for i, token in enumerate(rest) if token.startswith("-")), len(rest))
    return parser.parse_args(argv[: at + 1 + first_flag] + tokens + rest[first_flag:])


def _config_path(sub: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """--config's value, read as the full parse reads it (abbreviated, repeated) but before it, with
    required flags waived for this pass: the file may be what supplies them."""
    required = [action for action in sub._actions if action.required]
    for action in required:
        action.required = False
    try:
        return sub.parse_known_args(argv)[0].config
    finally:
        for action in required:
            action.required = True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
