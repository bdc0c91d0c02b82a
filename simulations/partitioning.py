"""How a simulation makes devices of the chatterbot corpus or the user's data.

The split itself is Flower Datasets' (``flwr_datasets.partitioner``): 'natural' is
``NaturalIdPartitioner`` (one device per value of ``data.partition_by``), 'iid' is
``IidPartitioner`` (``data.num_devices`` equal shares), 'dirichlet' is
``DirichletPartitioner`` (label skew over ``data.partition_by``, ``data.alpha``), so a
partition here is the one Flower's baselines and papers mean by the same words. The
partitioners only ever see a ``datasets.Dataset`` of row numbers and the partition column (as
strings): examples of any layout (chat turns included) never go through Arrow, and the rows a
partition picks index the examples as read.

Then, per device: fewer than ``data.min_examples`` examples and it is no client; with
``data.max_clients`` only the largest are kept; each keeps back ``data.heldout_fraction`` of
its examples (:func:`client.local_data.split_heldout`) with a seed of ``(data.seed, the
device's partition index)``, so a device's split does not depend on which others are kept.

A path that brings its own held-out part (``train``/``heldout`` files, a ``DatasetDict``'s
test split) has only its training part partitioned; its held-out part is ignored, because in
a simulation every held-out example belongs to a device (each device evaluates on its own, and
the central evaluation set is the union of theirs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.local_data import split_heldout
from kernels.data.examples import Example
from kernels.data.formats import UnknownColumnError, read_rows
from protocols.run_config import ConfigError, DataSection
from simulations.devices import DevicePart

#: The partition column's name inside the Dataset the partitioners see (beside "row"), so a
#: user column called "row" cannot collide.
_KEY = "partition_key"


@dataclass(frozen=True)
class _Group:
    """One partition: its index in the partitioner, its device name and example rows."""

    index: int
    name: str
    rows: tuple[int, ...]


def partition_source(data: DataSection) -> tuple[list[DevicePart], str]:
    """The devices of a chatterbot or path source and the data's layout ('text',
    'instruction' or 'chat'). Raises :class:`ConfigError` for settings the data cannot meet,
    and lets the reader's ``DataFormatError`` (which names the file and line) through."""
    examples, keys, layout = _read(data)
    groups = _partition(data, len(examples), keys)
    kept = [g for g in groups if len(g.rows) >= data.min_examples]
    if not kept:
        largest = max(groups, key=lambda g: len(g.rows))
        raise ConfigError(
            f"no device has data.min_examples = {data.min_examples} examples: the largest of "
            f"the {len(groups)} devices ({largest.name!r}) has {len(largest.rows)}; lower "
            "data.min_examples" + ("" if data.partition == "natural" else
                                   " or data.num_devices"))
    if data.max_clients and len(kept) > data.max_clients:
        # Ties go to the lower partition index: for 'natural' that is the name's order, as
        # NaturalIdPartitioner numbers the sorted values.
        kept = sorted(kept, key=lambda g: (-len(g.rows), g.index))[:data.max_clients]
    parts = []
    for group in sorted(kept, key=lambda g: g.index):
        train, heldout = split_heldout([examples[r] for r in group.rows],
                                       data.heldout_fraction, device_seed(data.seed, group.index))
        parts.append(DevicePart(group.name, train, heldout))
    return parts, layout


def device_seed(seed: int, index: int) -> int:
    """The held-out split's seed of partition ``index``: independent streams per device."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1)[0])


def _key_column(data: DataSection) -> str | None:
    """The column the partitioner reads: none for 'iid'; chatterbot's default 'device'."""
    if data.partition == "iid":
        return None
    column = data.partition_by or ("device" if data.source == "chatterbot" else "")
    if not column:
        raise ConfigError(f"data.partition = {data.partition!r} needs data.partition_by (the "
                          "column naming each example's device or label)")
    return column


def _read(data: DataSection) -> tuple[list[Example], list[str] | None, str]:
    """The examples, each one's partition-column value (None for 'iid') and the layout."""
    column = _key_column(data)
    if data.source == "chatterbot":
        from simulations.corpora.chatterbot import COLUMNS, load_conversations

        if column is not None and column not in COLUMNS:
            raise ConfigError(f"data.partition_by = {column!r}: chatterbot has no such "
                              f"column; its columns are {list(COLUMNS)}")
        conversations = load_conversations()
        return ([example for example, _ in conversations],
                None if column is None else [c[column] for _, c in conversations], "chat")
    try:
        examples, values, layout = read_rows(Path(data.source).expanduser(), data.format,
                                             [column] if column else [])
    except UnknownColumnError as err:
        raise ConfigError(f"data.partition_by = {column!r}: {err}") from None
    return examples, None if column is None else [v[column] for v in values], layout


def _partition(data: DataSection, n: int, keys: list[str] | None) -> list[_Group]:
    """Every partition the Flower Datasets partitioner makes, empty ones included."""
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        Partitioner,
    )

    if data.partition != "natural" and data.num_devices > n:
        raise ConfigError(f"data.num_devices = {data.num_devices} but the data has only {n} "
                          "examples; lower data.num_devices")
    rows = list(range(n))
    partitioner: Partitioner
    if data.partition == "natural":
        partitioner = NaturalIdPartitioner(partition_by=_KEY)
    elif data.partition == "iid":
        # IidPartitioner cuts contiguous shards: shuffle first, or a file sorted by user or
        # topic would give skewed devices.
        rows = np.random.default_rng([data.seed % 2**64]).permutation(n).tolist()
        partitioner = IidPartitioner(num_partitions=data.num_devices)
    else:
        # min_partition_size=0: a device too small is dropped by data.min_examples instead of
        # the partitioner resampling (and failing after 10 tries) with a changed split.
        partitioner = DirichletPartitioner(
            num_partitions=data.num_devices, partition_by=_KEY, alpha=float(data.alpha),
            min_partition_size=0, seed=data.seed % 2**64)
    columns: dict[str, list[int] | list[str]] = {"row": rows}
    if keys is not None:
        columns[_KEY] = [keys[r] for r in rows]
    partitioner.dataset = datasets.Dataset.from_dict(columns)
    groups = []
    for index in range(partitioner.num_partitions):
        name = (str(partitioner.partition_id_to_natural_id[index])
                if isinstance(partitioner, NaturalIdPartitioner)
                else f"{data.partition}-{index}")
        # Within a device, examples keep the source's order (iid rows were shuffled above,
        # DirichletPartitioner shuffles its own).
        groups.append(_Group(index, name, tuple(sorted(partitioner.load_partition(index)["row"]))))
    return groups
