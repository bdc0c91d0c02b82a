"""Every change the simulations and benchmarks make to Flower's internals, each scoped.

Written against ``flwr==1.41.0`` (pinned in ``pyproject.toml``). Each patch is a context
manager that applies it on entry and puts Flower's original back on exit, also when the
body raised; ``tests/simulations/test_flower_patches.py`` fails, naming the patch to
revisit, when the installed Flower no longer has what a patch replaces.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from simulations.seeded_node_ids import node_id_stream

#: The name ``InMemoryLinkState.create_node`` calls for a new node id, in its own module
#: (``flwr.server.superlink.linkstate.in_memory_linkstate``).
NODE_IDS_ATTR = "generate_rand_int_from_bytes"
#: The class attributes behind ``TaskIdentity``'s ``run_id``/``task_id``/``node_id``.
TASK_IDENTITY_ATTRS = ("_run_id", "_task_id", "_node_id")

_NODE_IDS_LOCK = threading.RLock()
_TASK_IDENTITY_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_node_ids(seed: int) -> Iterator[None]:
    """Within this scope the Simulation Engine's node ids come from a stream seeded by
    ``seed`` (:func:`simulations.seeded_node_ids.node_id_stream`, which says why).

    What Flower does: ``InMemoryLinkState.create_node`` (and ``create_run``, for run and
    task ids) calls ``generate_rand_int_from_bytes(num_bytes, exclude=...)``, imported by
    that name into ``in_memory_linkstate``, which draws from ``os.urandom``.

    Why we patch: the coordinator samples from the *set* of node ids, ordered by value, so
    random ids changed which partitions trained from run to run even with a seeded sampler.
    There is no setting for it; the module-level name is rebound to the seeded stream (same
    signature) and rebound to Flower's function on exit.

    Scope: one simulation (:func:`simulations.runner.run_federated` wraps it). Simulations
    in one process take turns (a lock; re-entrant in one thread, which restores in order).
    Deployed SuperLinks keep Flower's random ids.

    Still applies if ``in_memory_linkstate`` has ``generate_rand_int_from_bytes(num_bytes,
    exclude=None)`` and ``create_node`` calls it by that name (checked by the test).
    """
    from flwr.server.superlink.linkstate import in_memory_linkstate

    stream = node_id_stream(seed)
    with _NODE_IDS_LOCK:
        original = getattr(in_memory_linkstate, NODE_IDS_ATTR)
        setattr(in_memory_linkstate, NODE_IDS_ATTR, stream)
        try:
            yield
        finally:
            setattr(in_memory_linkstate, NODE_IDS_ATTR, original)


@contextlib.contextmanager
def task_identity(run_id: int = 1, task_id: int = 1, node_id: int = 0) -> Iterator[None]:
    """Within this scope this process has Flower's task identity ``run_id``/``task_id``/
    ``node_id`` (defaults: a ServerApp's, as Flower's own simulation entry sets it).

    What Flower does: every ``Message`` built in a process is stamped with
    ``flwr.supercore.task_identity.TaskIdentity``'s ids, which Flower's process entry points
    (``run_serverapp``, ``run_clientapp``, ``flwr.server.compat``) set once per process;
    unset, building a message raises ``RuntimeError``.

    Why we set it: in-process benchmarks (:mod:`simulations.bench.secagg_overhead`) drive
    the real strategies and ClientApp handlers without any Flower entry point. The ids are
    class attributes of an internal class; on exit they return to what they were (unset,
    usually).

    Still applies if ``TaskIdentity`` keeps its ids in ``_run_id``/``_task_id``/``_node_id``
    behind settable ``run_id``/``task_id``/``node_id`` properties (checked by the test).
    """
    from flwr.supercore.task_identity import TaskIdentity

    with _TASK_IDENTITY_LOCK:
        saved = {attr: getattr(TaskIdentity, attr) for attr in TASK_IDENTITY_ATTRS}
        try:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = (
                run_id, task_id, node_id)
            yield
        finally:
            for attr, value in saved.items():
                setattr(TaskIdentity, attr, value)
