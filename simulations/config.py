"""Loading a simulation's TOML config into the shared :class:`RunConfig` schema."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from protocols.run_config import ConfigError, RunConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (default: ``simulations/configs/default.toml``) and apply
    ``section.key=value`` overrides (values parsed as TOML: ``train.rounds=3``)."""
    path = path or DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
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


def to_toml(config: RunConfig) -> str:
    """Write the resolved config back as TOML (saved with every run)."""
    lines = []
    for section, values in config.to_nested().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set``, read by :func:`load_config`: the same two options on
    every command that takes a run config (simulate, export-edge, coordinator)."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config (default: simulations/configs/default.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value; repeatable")
