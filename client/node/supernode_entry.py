"""``flower-supernode`` with a shorter idle poll: ``python -m client.node.supernode_entry``.

Why: Flower 1.41's SuperNode sleeps a hard-coded 3 s after every pull that found no message
(``flwr/supernode/start_client_internal.py``) and checks for its ClientApp's reply every
0.5 s, so a message waits 1.5 s on average (up to 3 s) before a device even sees it — more
than the whole on-device time of a warm edge phase (issue #5 goal: ≤ 3 s per phase). There
is no setting for it, so this entry point runs Flower's own ``flower-supernode`` with those
two sleeps shortened (``FEDTUNE_SUPERNODE_POLL_S``, default :data:`DEFAULT_POLL_S`), and
nothing else changed. The cost is load on the SuperLink: one pull per device per interval.

It relies on a Flower internal (the module-level ``time`` of ``start_client_internal``):
the patch is :func:`client.flower_patches.short_supernode_sleeps`, around Flower's main;
``flwr`` is pinned, and if the internal moves the node runs unpatched with a warning.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from client.flower_patches import FLOWER_IDLE_SLEEP_S as FLOWER_IDLE_SLEEP_S  # re-exported
from client.flower_patches import short_supernode_sleeps
from protocols.processes import die_with_parent

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 1.0
MIN_POLL_S = 0.05  # faster floods the SuperLink


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


def main() -> int:
    from flwr.supernode.cli import flower_supernode

    die_with_parent()  # a SIGKILLed daemon must not leave this SuperNode training on

    # Flower's main runs the SuperNode until the process ends: the patch's scope.
    with short_supernode_sleeps(poll_interval()):
        sys.argv[0] = "flower-supernode"
        flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
