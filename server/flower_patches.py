"""Every change the coordinator makes to Flower's internals, each for an explicit scope.

Written against ``flwr==1.41.0`` (pinned in ``pyproject.toml``). Each patch is a context
manager that applies it on entry and puts Flower's original object back on exit, also when
the body raised; ``tests/server/test_flower_patches.py`` fails, naming the patch to
revisit, when the installed Flower no longer has what a patch replaces.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator

#: The attribute of ``flwr.serverapp.strategy.strategy_utils`` that ``sample_nodes`` calls
#: ``.sample`` on: the module ``random``, imported by that name.
SAMPLER_ATTR = "random"

_SAMPLER_LOCK = threading.RLock()


@contextlib.contextmanager
def flower_samples_with(sampler: random.Random) -> Iterator[random.Random]:
    """Within this scope Flower's strategies sample devices with ``sampler``.

    What Flower does: ``strategy_utils.sample_nodes`` (used by ``FedAvg.configure_train``
    and ``configure_evaluate``) draws the round's nodes with ``random.sample``, i.e. from
    the process-global generator, through the module-level name ``random`` of
    ``strategy_utils``.

    Why we patch: that generator is shared with everything else in the process, and a run's
    sample must be either reproducible from ``train.seed`` or secret under client-level DP
    (:mod:`server.node_sampling` chooses the generator, and says why). There is no setting
    for it, so the name ``random`` of ``strategy_utils`` is rebound to ``sampler`` (which
    has the ``sample`` method ``sample_nodes`` calls) and rebound to Flower's module on exit.

    Scope: one coordinator run (:func:`server.app.run_coordinator` wraps its rounds). Runs
    in one process take turns (a lock; re-entrant in one thread, which restores in order).

    Still applies if ``sample_nodes`` calls ``random.sample(all_nodes, sample_size)`` and
    ``strategy_utils`` draws from ``random`` nowhere else (checked by the test).
    """
    from flwr.serverapp.strategy import strategy_utils

    with _SAMPLER_LOCK:
        original = getattr(strategy_utils, SAMPLER_ATTR)
        setattr(strategy_utils, SAMPLER_ATTR, sampler)
        try:
            yield sampler
        finally:
            setattr(strategy_utils, SAMPLER_ATTR, original)
