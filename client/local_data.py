"""A device's own data: read from its own files, split once into training and held-out parts.

The data stays in this process. Nothing here is ever put into a Flower record: the trainer
turns it into adapter tensors and numbers, and only those leave.

A deployed device names its data in its own config (``fedtune client``'s ``[data] path``);
a simulated device reads the folder the simulation wrote for it. Both go through
:func:`load_device_data`, so a simulation exercises the device's own loading path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from kernels.data.examples import Example
from kernels.data.formats import DataFormat, DataFormatError, read_dataset


class LocalDataError(ValueError):
    """The device's data cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class LocalData:
    """One device's examples, split into local training and held-out parts.

    ``source`` says where they came from (for error messages). A ``str`` item is taken as a
    plain document.
    """

    client_id: str
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("train", "heldout"):
            items: Sequence[Example | str] = getattr(self, name)
            object.__setattr__(self, name, tuple(
                Example(text=item) if isinstance(item, str) else item for item in items))

    @property
    def where(self) -> str:
        return self.source or f"client {self.client_id}"

    @property
    def train_texts(self) -> tuple[str, ...]:
        """The training part's plain documents (tools that work on raw text: the leakage
        audit, calibration); conversations are left out."""
        return tuple(e.text for e in self.train if e.text is not None)


@dataclass(frozen=True)
class DeviceDataSource:
    """Where a device's data is and how to read and split it (a daemon's ``[data]``)."""

    path: Path
    format: DataFormat = "auto"
    heldout_fraction: float = 0.2
    seed: int = 0


def load_device_data(source: DeviceDataSource, client_id: str) -> LocalData:
    """Read ``source.path``; use its own held-out part if it brings one (``train.*`` +
    ``heldout.*``/``test.*``), else keep back ``heldout_fraction`` of the examples
    (at least one), chosen with ``seed``. Cached per process by the files' sizes and times,
    so an edited file is read again."""
    path = Path(source.path)
    return _load(str(path.resolve()), _signature(path), source.format,
                 source.heldout_fraction, source.seed, client_id)


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()  # read_dataset reports the missing path


@lru_cache(maxsize=4)
def _load(path: str, signature: tuple[tuple[str, int, int], ...], format: DataFormat,
          heldout_fraction: float, seed: int, client_id: str) -> LocalData:
    try:
        dataset = read_dataset(Path(path), format)
    except DataFormatError as err:
        raise LocalDataError(str(err)) from None
    if dataset.heldout is not None:
        if not dataset.train or not dataset.heldout:
            raise LocalDataError(f"{path}: both parts of the split need at least one example")
        return LocalData(client_id, dataset.train, dataset.heldout, source=path)
    train, heldout = split_heldout(dataset.train, heldout_fraction, seed)
    if not train:
        raise LocalDataError(
            f"{path}: {len(dataset.train)} example(s) is too little to keep "
            f"{heldout_fraction:.0%} back and still train; add data or lower the held-out "
            "fraction")
    return LocalData(client_id, train, heldout, source=path)


def split_heldout(examples: Sequence[Example], fraction: float, seed: int
                  ) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """``(train, heldout)``: ``ceil(fraction * n)`` (at least one) examples held out, drawn
    with ``seed``; both parts keep the file order."""
    if not 0 < fraction < 1:
        raise LocalDataError(f"held-out fraction {fraction}: must be in (0, 1)")
    n = len(examples)
    if n == 0:
        return (), ()
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, math.ceil(fraction * n))
    held = sorted(order[:n_held].tolist())
    kept = sorted(order[n_held:].tolist())
    return tuple(examples[i] for i in kept), tuple(examples[i] for i in held)


def simulated_device_folder(root: Path, partition_id: int) -> Path:
    """Where a simulation keeps simulated device ``partition_id``'s own data."""
    return Path(root) / f"{partition_id:05d}"
