"""Every change the device side makes to Flower's internals, each for an explicit scope.

Written against ``flwr==1.41.0`` (pinned in ``pyproject.toml``). Each patch is a context
manager that applies it on entry and puts Flower's original back on exit, also when the
body raised. Both are optional speed-ups: if the installed Flower no longer looks as
expected, the context manager changes nothing and yields ``False`` (the caller logs it),
and ``tests/client/test_flower_patches.py`` fails, naming the patch to revisit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# --- the SuperNode's idle poll ----------------------------------------------------------------

#: ``flwr.supernode.start_client_internal`` sleeps this long after a pull that found no message
FLOWER_IDLE_SLEEP_S = 3
#: ... and this long between checks for its ClientApp's reply.
FLOWER_REPLY_SLEEP_S = 0.5
#: The module whose module-level name ``time`` :func:`short_supernode_sleeps` replaces.
START_CLIENT_INTERNAL = "flwr.supernode.start_client_internal"


class _ShortSleeps:
    """Stands in for the ``time`` module inside ``start_client_internal`` only."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self.reply_s = min(FLOWER_REPLY_SLEEP_S, idle_s / 4)

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.idle_s
        elif seconds == FLOWER_REPLY_SLEEP_S:
            seconds = self.reply_s
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@contextlib.contextmanager
def short_supernode_sleeps(idle_s: float, module: ModuleType | None = None) -> Iterator[bool]:
    """Within this scope the SuperNode polls every ``idle_s`` seconds when idle (and checks
    for its ClientApp's reply every ``min(0.5, idle_s / 4)`` s); yield whether it applied.

    What Flower does: the SuperNode's loop (``start_client_internal``) calls
    ``time.sleep(3)`` after every pull that found no message and ``time.sleep(0.5)`` while
    waiting for its ClientApp's reply, through its module-level name ``time``.

    Why we patch: a message waited 1.5 s on average (up to 3 s) before a device saw it,
    more than a warm edge phase's whole on-device time, and there is no setting for it. The
    module's ``time`` is rebound to a stand-in whose ``sleep`` shortens exactly those two
    durations (everything else is the real ``time``), and rebound to ``time`` on exit.

    Scope: the SuperNode's whole life: :func:`client.node.supernode_entry.main` runs
    Flower's ``flower-supernode`` inside it, in a process of its own.

    Still applies if ``start_client_internal`` has a module-level ``time`` that is the
    ``time`` module and calls ``time.sleep(3)`` and ``time.sleep(0.5)`` (checked by the
    test). ``module`` is for tests; by default, Flower's ``start_client_internal``.
    """
    if module is None:
        import importlib

        try:
            module = importlib.import_module(START_CLIENT_INTERNAL)
        except ImportError:
            module = ModuleType("missing")
    original = getattr(module, "time", None)
    if original is not time:
        log.warning("flwr's start_client_internal has no module-level `time`; the SuperNode "
                    "keeps Flower's 3 s idle poll")
        yield False
        return
    module.time = _ShortSleeps(idle_s)  # type: ignore[attr-defined]
    try:
        yield True
    finally:
        module.time = original  # type: ignore[attr-defined]


# --- a warm ClientApp's message pull ----------------------------------------------------------

#: Retry delays (s) of a warm ClientApp pulling its message from the local SuperNode:
#: 0.1, 0.2, 0.4, 0.5, 0.5, ... instead of Flower's 1, 2, 4, 8, 10, ... (loopback requests).
WARM_PULL_BACKOFF = {"initial_backoff": 0.1, "backoff_cap": 0.5}
#: The ClientApp runtime module, and the name in it that :func:`warm_message_pull` rebinds.
RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"
PULL_ATTR = "pull_and_inflate_object_from_tree"


def _is_tuned(pull: object) -> bool:
    return isinstance(pull, functools.partial) and pull.keywords == WARM_PULL_BACKOFF


@contextlib.contextmanager
def warm_message_pull() -> Iterator[bool]:
    """Within this scope the preloaded ClientApp runtime retries unavailable message objects
    after 0.1 s, 0.2, 0.4, then every 0.5 s (:data:`WARM_PULL_BACKOFF`); yield whether it
    applied (never imports the runtime: False unless it is already loaded).

    What Flower does: ``run_clientapp`` pulls its message's objects from the SuperNode with
    ``pull_and_inflate_object_from_tree(...)``, imported by that name, retrying an
    unavailable object after 1 s, then 2, 4, ... (cap 10 s).

    Why we patch: a cold ClientApp starts seconds after its message arrived, when the
    SuperNode has it all; a warm one (forked from :mod:`client.node.warm_forkserver`)
    starts ~0.1 s after, while the SuperNode is still downloading it from the SuperLink,
    and lost 1.5–3 s per message to that backoff. The name is rebound to a
    ``functools.partial`` with :data:`WARM_PULL_BACKOFF`, and to Flower's function on exit.

    Scope: the fork server's serving, after its preload (:func:`warm_forkserver.main`);
    each forked child inherits the patch and ends inside the scope (``os._exit``). Within
    an enclosing scope it changes nothing (and yields True).

    Still applies if ``run_clientapp`` has ``pull_and_inflate_object_from_tree`` taking
    keyword-only ``initial_backoff`` and ``backoff_cap`` (checked by the test).
    """
    runtime = sys.modules.get(RUN_CLIENTAPP)
    pull = getattr(runtime, PULL_ATTR, None)
    if runtime is None or pull is None or _is_tuned(pull):
        yield pull is not None
        return
    params = inspect.signature(pull).parameters
    if not all(params.get(k) and params[k].kind is inspect.Parameter.KEYWORD_ONLY
               for k in WARM_PULL_BACKOFF):
        yield False
        return
    setattr(runtime, PULL_ATTR, functools.partial(pull, **WARM_PULL_BACKOFF))
    try:
        yield True
    finally:
        setattr(runtime, PULL_ATTR, pull)
