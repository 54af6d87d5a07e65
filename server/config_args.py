"""Flags generated from a config dataclass's fields (help and choices from each field's metadata):
a field the engine adds to `EngineConfig` becomes a flag of `expertflow serve` with no change here,
and other commands can expose their own config dataclasses the same way."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

SCALARS: tuple[type, ...] = (int, float, str)
C = TypeVar("C")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, config_cls: type, title: str) -> None:
    """One flag per field of `config_cls`, named after the field with dashes."""
    group = parser.add_argument_group(title, f"the fields of {config_cls.__name__}")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        group.add_argument(
            flag_name(f.name), dest=f.name, **_argument(config_cls, f, hints[f.name])
        )


def config_from_args(config_cls: type[C], args: argparse.Namespace) -> C:
    """The dataclass from parsed flags; its own checks (__post_init__) still run."""
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def _argument(config_cls: type, f: dataclasses.Field[Any], hint: Any) -> dict[str, Any]:
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
    elif all(t in SCALARS for t in members):
        kwargs["type"] = members[0] if len(members) == 1 else _first_parse(tuple(members))
    else:
        raise TypeError(
            f"{config_cls.__name__}.{f.name}: type {hint!r} has no flag form; use bool, int, float, str "
            "or a union of these with None (and metadata choices=... for a fixed set)"
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
