"""The machinery of fedtune's one config schema: typed dataclass sections, checked generically.

Every setting is a field of a frozen dataclass section, declared with :func:`setting`: its
type hint says what it holds (``bool``, ``int``, ``float``, ``str``, a ``Literal`` of
choices, ``tuple[str, ...]`` for a list, ``Path | None`` for a path), its metadata holds the
help text, the bounds and, for choices that live in a registry, a function listing them.
:class:`Section` checks all of that in ``__post_init__`` — the same check whether a section
is built from TOML, from Flower's flat run config, from ``--set`` or in code — and a
section's :meth:`Section.check` adds only the rules that tie fields together.

Why not pydantic or attrs: the base install (what every device runs) stays numpy,
cryptography and Flower; these ~150 lines are all the validation fedtune needs.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

Scalar = bool | int | float | str
S = TypeVar("S", bound="Section")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names it."""


#: The default of a setting that has none: the file must give it.
REQUIRED: Any = dataclasses.MISSING


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None,
            choices: Callable[[], Sequence[Any]] | None = None, table: str = "") -> Any:
    """One config field: its default (or :data:`REQUIRED`), its help text and its bounds
    (inclusive ``ge``/``le``, exclusive ``gt``/``lt``); ``choices`` lists valid values kept
    in a registry elsewhere (a ``Literal`` type states fixed choices); ``table`` is the TOML
    table that holds it when that is not the section's own (a flat config read from
    several tables, like the device daemon's)."""
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata: dict[str, Any] = {"help": help,
                                **{k: v for k, v in bounds.items() if v is not None}}
    if choices is not None:
        metadata["choices"] = choices
    if table:
        metadata["table"] = table
    return field(default=default, metadata=metadata)


def bounds_text(meta: Mapping[str, Any]) -> str:
    """``must be in (0, 1]`` / ``must be >= 1`` from a field's bounds ('' if none)."""
    low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    high = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if low and high:
        return f"must be in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f"must be {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _in_bounds(value: float, meta: Mapping[str, Any]) -> bool:
    return not (("ge" in meta and value < meta["ge"]) or ("gt" in meta and value <= meta["gt"])
                or ("le" in meta and value > meta["le"]) or ("lt" in meta and value >= meta["lt"]))


def type_name(kind: Any) -> str:
    """How a field's type reads in help and errors."""
    if get_origin(kind) is Literal:
        return " | ".join(repr(c) for c in get_args(kind))
    if get_origin(kind) is tuple:
        return f"list of {get_args(kind)[0].__name__}"
    if _optional_path(kind) or kind is Path:
        return "path"
    return str(getattr(kind, "__name__", kind))


def is_path(kind: Any) -> bool:
    """Whether a field holds a path (relative ones are resolved by whoever reads the file)."""
    return kind is Path or _optional_path(kind)


def _optional_path(kind: Any) -> bool:
    return get_origin(kind) in (Union, types.UnionType) and set(get_args(kind)) == {Path,
                                                                                  type(None)}


def coerce(key: str, kind: Any, value: Any) -> Any:
    """Check one value against its type; return it in canonical form.

    Accepted beyond the exact type: an int for a float (TOML writes ``1`` for 1.0), a TOML
    list or a comma-separated string for a list, a string for a path.
    """
    origin = get_origin(kind)
    if origin is Literal:
        if value not in get_args(kind) or type(value) is not type(get_args(kind)[0]):
            raise ConfigError(f"{key} = {value!r}: must be one of {list(get_args(kind))}")
        return value
    if kind is Path:
        if isinstance(value, Path) or (isinstance(value, str) and value):
            return Path(value)
        raise ConfigError(f"{key} = {value!r}: expected a path")
    if origin is tuple and get_args(kind)[0] in (int, float) and isinstance(value, int | float) \
            and not isinstance(value, bool):
        value = [value]  # one number is a list of one, as the string "1" already is
    if origin is tuple and get_args(kind)[0] is int:
        items = [i for i in value.split(",") if i.strip()] if isinstance(value, str) else value
        try:
            if not isinstance(items, list | tuple) or any(isinstance(i, bool | float)
                                                          for i in items):
                raise ValueError
            return tuple(int(i) for i in items)
        except ValueError:
            raise ConfigError(f"{key} = {value!r}: expected a list of integers or a "
                              "comma-separated string of them") from None
    if origin is tuple and get_args(kind)[0] is float:
        items = [i for i in value.split(",") if i.strip()] if isinstance(value, str) else value
        try:
            if not isinstance(items, list | tuple) or any(isinstance(i, bool) for i in items):
                raise ValueError
            numbers = tuple(float(i) for i in items)
        except ValueError:
            raise ConfigError(f"{key} = {value!r}: expected a list of numbers or a "
                              "comma-separated string of them") from None
        if not all(math.isfinite(x) for x in numbers):
            raise ConfigError(f"{key} = {value!r}: every number must be finite")
        return numbers
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{key} = {value!r}: expected a list of strings or a "
                              "comma-separated string")
        return tuple(i.strip() for i in items if i.strip())
    if _optional_path(kind):
        if value is None or isinstance(value, Path):
            return value
        if isinstance(value, str):
            return Path(value) if value else None
        raise ConfigError(f"{key} = {value!r}: expected a path, got {type(value).__name__}")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"{key}: unsupported config type {kind!r}")
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {kind.__name__}, "
                          f"got {type(value).__name__}")
    return value


def key_of(section: type[Section], f: dataclasses.Field[Any]) -> str:
    """A field's name in files and messages: ``table.key``."""
    return f"{f.metadata.get('table', section.NAME)}.{f.name}"


class Section:
    """Base of every config section (a frozen dataclass): generic checks, then :meth:`check`.

    ``NAME`` is the section's name in TOML and in error messages (``train.rounds = 0: ...``);
    ``ERROR`` the :class:`ConfigError` subclass its errors raise.
    """

    NAME: ClassVar[str] = ""
    ERROR: ClassVar[type[ConfigError]] = ConfigError

    def __post_init__(self) -> None:
        try:
            self._check_fields()
            self.check()
        except ConfigError as err:
            if isinstance(err, self.ERROR):
                raise
            raise self.ERROR(str(err)) from None

    def _check_fields(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            key = key_of(type(self), f)
            value = coerce(key, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            meta = f.metadata
            if isinstance(value, int | float) and not isinstance(value, bool) and not _in_bounds(
                    value, meta):
                raise ConfigError(f"{key} = {value!r}: {bounds_text(meta)}")
            if "choices" in meta and value not in (valid := list(meta["choices"]())):
                raise ConfigError(f"{key} = {value!r}: must be one of {valid}")

    def check(self) -> None:
        """Rules that tie this section's fields together (none by default)."""

    @classmethod
    def from_mapping(cls: type[S], values: Any) -> S:
        """Build from ``{"key": value}``, refusing unknown keys with the valid ones named."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{cls.NAME}] must be a table, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown key(s) {[f'{cls.NAME}.{k}' for k in unknown]}; "
                              f"valid keys in [{cls.NAME}]: {sorted(known)}")
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


def to_scalar(value: Any) -> Scalar:
    """A field's value as Flower's flat run config and TOML overrides carry it: lists as a
    comma-separated string, paths as strings (``""`` for none)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if value is None:
        return ""
    return value  # type: ignore[no-any-return]


def describe(section: type[Section]) -> list[tuple[str, str, Any, str]]:
    """``(key, type, default, help)`` of every field: for ``--help`` and the default TOML."""
    rows = []
    hints = get_type_hints(section)
    for f in fields(section):  # type: ignore[arg-type]
        default = (f.default if f.default_factory is dataclasses.MISSING
                   else f.default_factory())
        if default is dataclasses.MISSING:
            default = "(required)"
        help_text = f.metadata.get("help", "")
        limits = bounds_text(f.metadata)
        if limits:
            help_text += f" ({limits.removeprefix('must be ')})"
        if "choices" in f.metadata:
            help_text += f" (one of {list(f.metadata['choices']())})"
        rows.append((key_of(section, f), type_name(hints[f.name]), default, help_text))
    return rows
