"""Run configs as TOML: read with ``--set`` overrides, write with every key's help.

The defaults are the schema's (:class:`protocols.run_config.RunConfig`); a TOML file only
needs the keys it changes. :func:`to_toml` writes a complete config, with each key's help as
a comment: ``simulations/configs/default.toml`` is its output for the defaults (a test
keeps the two identical) and every run folder saves its resolved config the same way.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from protocols.config_schema import Section, describe, to_scalar
from protocols.run_config import ConfigError, RunConfig


def read_toml(path: Path, *, what: str, error: type[ConfigError] = ConfigError
              ) -> dict[str, Any]:
    """A TOML file's tables; ``error`` (naming the file) if it is missing or not TOML."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}") from None


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The schema's defaults, then ``path`` (if given), then ``section.key=value``
    overrides (values parsed as TOML: ``train.rounds=3``, ``lora.target_modules=["q_proj"]``;
    a bare word is a string: ``model.source=/path/to/model``)."""
    raw: dict[str, Any] = {} if path is None else read_toml(path, what="config file")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # bare words are strings: model.source=/path/to/model
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        table[name] = value
    return RunConfig.from_nested(raw)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (lists as TOML arrays)."""
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    value = to_scalar(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def to_toml(config: RunConfig, *, comments: bool = False) -> str:
    """``config`` as TOML that :func:`load_config` reads back to an equal config; with
    ``comments``, each section's and key's help as comments (the documented defaults)."""
    lines: list[str] = []
    for name, section in RunConfig.sections().items():
        if comments:
            doc = " ".join((section.__doc__ or "").split())
            lines.append(f"# {doc}")
        lines.append(f"[{name}]")
        values = getattr(config, name).to_mapping()
        for key, _, _, help_text in describe(section):
            short = key.split(".", 1)[1]
            line = f"{short} = {toml_value(values[short])}"
            lines.append(f"{line}  # {help_text}" if comments else line)
        lines.append("")
    return "\n".join(lines)


def describe_keys(sections: dict[str, type[Section]] | None = None) -> str:
    """Every key with its type, default and help: the text ``--help`` ends with."""
    rows = []
    for section in (sections or RunConfig.sections()).values():
        for key, kind, default, help_text in describe(section):
            rows.append(f"  {key} ({kind}, default {toml_value(default)})\n      {help_text}")
    return "\n".join(rows)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``, read by :func:`load_config`: the same two options on
    every command that takes a run config (simulate, export-edge, coordinator)."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config with the keys to change (default: the defaults, "
                             "as in simulations/configs/default.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable. Keys: `fedtune config`")
