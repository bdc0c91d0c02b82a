"""The LEAF-style federated split of Shakespeare: one simulated device per speaking role.

Roles differ in how much and how they speak, so the split is naturally non-IID. Each role's
speeches are split once into local training and held-out parts; the coordinator's central
validation set is drawn from the held-out parts only.
:func:`simulations.devices.prepare_devices` writes each role's parts into its own folder.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from client.shakespeare import Speech
from protocols.run_config import DataSection


def split_roles(speeches: Sequence[Speech], data: DataSection) -> list[dict[str, object]]:
    """Group speeches by (play, role), keep roles with enough speeches, split each one."""
    groups: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
    for speech in speeches:
        groups.setdefault((speech.play, speech.role), []).append(speech.text)
    kept = [(k, v) for k, v in groups.items() if len(v) >= data.min_examples]
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
