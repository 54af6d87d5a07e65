"""Engine flags generated from `EngineConfig`'s fields: a field the engine adds is a flag of
`expertflow serve` (and of any command that calls `add_engine_args`) with no change here."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from engine import EngineConfig

SCALARS: tuple[type, ...] = (int, float, str)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine", "passed to the engine (EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        group.add_argument(flag_name(f.name), dest=f.name, **_argument(f, hints[f.name]))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Raises engine.ConfigError when the values do not make sense together."""
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.field_names()})


def _argument(f: dataclasses.Field[Any], hint: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kwargs["default"] = f.default_factory()
    else:
        kwargs["required"] = True
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    members = [t for t in _union_members(hint) if t is not type(None)]
    if members == [bool]:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(members[0]) is typing.Literal and len(members) == 1:
        values = typing.get_args(members[0])
        kwargs["choices"] = values
        kwargs["type"] = _first_parse(tuple(dict.fromkeys(type(v) for v in values)))
    elif all(t in SCALARS for t in members):
        kwargs["type"] = members[0] if len(members) == 1 else _first_parse(tuple(members))
    else:
        raise TypeError(
            f"EngineConfig.{f.name}: type {hint!r} has no flag form; use bool, int, float, str, "
            "a Literal or a union of these (None allowed)"
        )
    return kwargs


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _first_parse(kinds: tuple[type, ...]) -> Callable[[str], Any]:
    """For `int | str` fields such as a horizon that is a number or "auto": the most specific
    type that parses the text wins (int, then float, then str)."""
    kinds = tuple(sorted(kinds, key=SCALARS.index))

    def parse(text: str) -> Any:
        for kind in kinds:
            try:
                return kind(text)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(k.__name__ for k in kinds)}: {text!r}"
        )

    parse.__name__ = " | ".join(k.__name__ for k in kinds)  # argparse names the type in errors
    return parse
