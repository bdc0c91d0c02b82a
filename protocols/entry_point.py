"""What every fedtune command does around its work: environment, logging, user errors.

``fedtune``, ``fedtune-coordinator`` and ``fedtune-client`` all set the same process
environment (:mod:`protocols.environment`) before Flower, Ray or Hugging Face load, log in
one format, and turn an error that is the user's to fix into one line and exit status 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from protocols.environment import configure_environment

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    # Flower logs through its own console handler; propagating would print every line twice.
    logging.getLogger("flwr").propagate = False


def log_to_stderr(names: Sequence[str]) -> None:
    """Send the named loggers' INFO records to stderr, once per process, unless logging is
    set up already (a root handler: ``fedtune simulate``). Flower's app processes (a
    deployed ServerApp or ClientApp) set up only Flower's own logger and capture their
    stderr into the run's log stream, where fedtune's records then appear too."""
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()  # sys.stderr as it is now: Flower may have redirected it
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in names:
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def run_command(prog: str, command: Callable[[list[str]], int], argv: Sequence[str] | None,
                *, user_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``command(argv)`` as the program ``prog``; return its exit status."""
    configure_environment()
    setup_logging()
    try:
        return int(command(list(sys.argv[1:] if argv is None else argv)))
    except user_errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
