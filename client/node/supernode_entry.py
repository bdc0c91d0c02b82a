"""``flower-supernode`` with a shorter idle poll: ``python -m client.node.supernode_entry``.

Why: Flower 1.41's SuperNode sleeps a hard-coded 3 s after every pull that found no message
(``flwr/supernode/start_client_internal.py``) and checks for its ClientApp's reply every
0.5 s, so a message waits 1.5 s on average (up to 3 s) before a device even sees it — more
than the whole on-device time of a warm edge phase (issue #5 goal: ≤ 3 s per phase). There
is no setting for it, so this entry point runs Flower's own ``flower-supernode`` with those
two sleeps shortened (``FEDTUNE_SUPERNODE_POLL_S``, default :data:`DEFAULT_POLL_S`), and
nothing else changed. The cost is load on the SuperLink: one pull per device per interval.

It relies on a Flower internal (the module-level ``time`` of ``start_client_internal``);
``flwr`` is pinned, and if the internal moves the node runs unpatched with a warning.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 1.0
FLOWER_IDLE_SLEEP_S = 3  # start_client_internal: after an empty pull
MIN_POLL_S = 0.05  # faster floods the SuperLink
FLOWER_REPLY_SLEEP_S = 0.5  # start_client_internal: waiting for the ClientApp's reply


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


def check_poll_interval(value: float) -> float:
    """The one bound on the idle poll, wherever it is set (env, SuperNodeSpec, daemon TOML):
    faster than 0.05 s floods the SuperLink, slower than Flower's own 3 s gains nothing."""
    if not MIN_POLL_S <= value <= FLOWER_IDLE_SLEEP_S:
        raise ValueError(f"{value}: expected {MIN_POLL_S} to {FLOWER_IDLE_SLEEP_S} seconds")
    return value


def poll_interval(environ: Any = os.environ) -> float:
    raw = environ.get(POLL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_POLL_S
    except ValueError:
        raise ValueError(f"{POLL_ENV}={raw!r}: expected seconds, e.g. 1.0") from None
    try:
        return check_poll_interval(value)
    except ValueError as err:
        raise ValueError(f"{POLL_ENV}={err}") from None


def patch(module: ModuleType, idle_s: float) -> bool:
    """Shorten ``module``'s sleeps; False (and a warning) if it does not look as expected."""
    if getattr(module, "time", None) is not time:
        log.warning("flwr's start_client_internal has no module-level `time`; the SuperNode "
                    "keeps Flower's 3 s idle poll")
        return False
    module.time = _ShortSleeps(idle_s)  # type: ignore[attr-defined]
    return True


def main() -> int:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    patch(start_client_internal, poll_interval())
    sys.argv[0] = "flower-supernode"
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
