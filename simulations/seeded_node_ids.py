"""Reproducible client sampling on Flower's Simulation Engine.

Flower 1.41 gives every simulated SuperNode a random 64-bit id (``os.urandom``, in
``InMemoryLinkState.create_node``), and the coordinator samples from the *set* of those ids,
whose order follows their values: even with a seeded sampler (``server/node_sampling.py``)
which partitions trained in a round changed from run to run. Within :func:`seeded_node_ids`
the in-memory LinkState draws node ids from a stream seeded by the run's seed, so ids,
their order, and so the sampled partitions repeat exactly.

Simulation only (deployed SuperNodes keep Flower's random ids) and only for the engine's
own in-memory state; it patches one module-level name of the pinned Flower, checked by
``tests/simulations/test_split_and_config.py``.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator

_LOCK = threading.Lock()
#: The name ``InMemoryLinkState.create_node`` calls for a new id, in its own module.
PATCHED = "generate_rand_int_from_bytes"


@contextlib.contextmanager
def seeded_node_ids(seed: int) -> Iterator[None]:
    """Draw the Simulation Engine's node ids from a stream seeded by ``seed`` (only the
    engine's node registration calls the patched name, in order, on one thread)."""
    from flwr.server.superlink.linkstate import in_memory_linkstate

    stream = random.Random(f"fedtune-node-ids|{seed}")

    def seeded(num_bytes: int, exclude: set[int] | None = None) -> int:
        while True:
            number = stream.getrandbits(8 * num_bytes)
            if not exclude or number not in exclude:
                return number

    with _LOCK:  # one simulation at a time patches the module
        original = getattr(in_memory_linkstate, PATCHED)
        setattr(in_memory_linkstate, PATCHED, seeded)
        try:
            yield
        finally:
            setattr(in_memory_linkstate, PATCHED, original)
