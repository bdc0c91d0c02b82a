"""Typed reads from Flower records, failing with the key named.

Record values are unions (number, string, list, bytes...); reading one as the wrong kind
must be a clear protocol error, not a ``TypeError`` deep inside training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class RecordError(ValueError):
    """A record lacks a key or holds the wrong kind of value there."""


def _get(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise RecordError(f"record has no `{key}` (keys: {sorted(record)})")
    return record[key]


def get_int(record: Mapping[str, Any], key: str) -> int:
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"`{key}`: expected an integer, got {value!r}")
    return value


def get_float(record: Mapping[str, Any], key: str) -> float:
    value = _get(record, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"`{key}`: expected a number, got {value!r}")
    return float(value)


def get_str(record: Mapping[str, Any], key: str) -> str:
    value = _get(record, key)
    if not isinstance(value, str):
        raise RecordError(f"`{key}`: expected a string, got {value!r}")
    return value
