"""Reproducible client sampling on Flower's Simulation Engine.

Flower 1.41 gives every simulated SuperNode a random 64-bit id (``os.urandom``, in
``InMemoryLinkState.create_node``), and the coordinator samples from the *set* of those ids,
whose order follows their values: even with a seeded sampler (``server/node_sampling.py``)
which partitions trained in a round changed from run to run. Within
:func:`simulations.flower_patches.seeded_node_ids` the in-memory LinkState draws node ids
from :func:`node_id_stream`, seeded by the run's seed, so ids, their order, and so the
sampled partitions repeat exactly.

Simulation only (deployed SuperNodes keep Flower's random ids) and only for the engine's
own in-memory state; the patch itself, and what it relies on in the pinned Flower, is in
:mod:`simulations.flower_patches`.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def node_id_stream(seed: int) -> Callable[[int, set[int] | None], int]:
    """Ids drawn from a stream seeded by ``seed``, with the signature of Flower's
    ``generate_rand_int_from_bytes(num_bytes, exclude=None)`` (the engine registers its
    nodes, and creates its run, in order on one thread, so the ids repeat)."""
    stream = random.Random(f"fedtune-node-ids|{seed}")

    def seeded(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            number = stream.getrandbits(8 * num_bytes)
            if not exclude or number not in exclude:
                return number

    return seeded
