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
    """Parses twice when --config is given: the file's values go in right after the command name,
    so the same flags on the command line come later and override them."""
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        sub = parsers[args.command]
        try:
            tokens = config_file_tokens(sub, args.config)
        except ConfigFileError as exc:
            sub.error(str(exc))
        at = argv.index(args.command) + 1
        args = parser.parse_args(argv[:at] + tokens + argv[at:])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
