"""A device's own text: what it trains on and what it keeps back for evaluation.

The data stays in this process. Nothing here is ever put into a Flower record: the trainer
turns it into adapter tensors and numbers, and only those leave.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PARTITIONS_FORMAT = "fedtune-partitions/1"


@dataclass(frozen=True)
class LocalTextData:
    """One device's text, split once into local training and held-out parts."""

    client_id: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]


class LocalDataError(ValueError):
    """The device's data cannot be loaded; the message says what to fix."""


@lru_cache(maxsize=2)
def _read_partitions(path: str) -> list[dict[str, object]]:
    file = Path(path)
    if not file.is_file():
        raise LocalDataError(
            f"partitions file {file} does not exist; run `fedtune prepare` or check "
            "data.partitions-file"
        )
    raw = json.loads(file.read_text(encoding="utf-8"))
    if raw.get("format") != PARTITIONS_FORMAT:
        raise LocalDataError(
            f"{file} is not a {PARTITIONS_FORMAT} file (format={raw.get('format')!r})"
        )
    clients = raw["clients"]
    assert isinstance(clients, list)
    return clients


def load_partition(partitions_file: Path, partition_id: int) -> LocalTextData:
    """Load the simulated device ``partition_id`` from a partitions file.

    A simulation keeps every simulated device's text in one file on the simulating host;
    each ClientApp instance reads only its own entry.
    """
    clients = _read_partitions(str(partitions_file))
    if not 0 <= partition_id < len(clients):
        raise LocalDataError(
            f"partition-id {partition_id} is out of range: {partitions_file} has "
            f"{len(clients)} clients"
        )
    entry = clients[partition_id]
    return LocalTextData(
        client_id=str(entry["client_id"]),
        train=tuple(entry["train"]),  # type: ignore[arg-type]
        heldout=tuple(entry["heldout"]),  # type: ignore[arg-type]
    )
