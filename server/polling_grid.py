"""A Flower ``Grid`` that waits for replies with a configurable polling interval.

Why not Flower's own: in 1.41 the deployment grid (``HttpGrid.send_and_receive``) sleeps a
hard-coded 3 s between pulls of replies, so every message exchange is rounded up to the
next multiple of 3 s after the last reply lands — on loopback that was most of an edge
client's round trip (issue #5: measured phases of ~7 s around ~2 s of device time), and
secure aggregation pays it four times a round. This wrapper keeps Flower's grid for
everything and re-implements only the wait, through the public ``push_messages`` /
``pull_messages`` API; the simulation's in-memory grid is wrapped the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

DEFAULT_POLL_INTERVAL_S = 0.25


class RunStopped(RuntimeError):
    """The process running the ServerApp was stopped (Ctrl-C, SIGTERM) mid-run."""


class PollingGrid(Grid):
    """Delegates to ``grid``; :meth:`send_and_receive` pulls every ``interval`` seconds.

    ``stop``, when set, ends a wait with :class:`RunStopped`: a simulation interrupted in
    its main thread sets it, so the ServerApp thread does not wait out the round timeout
    for replies that will never come (and keep the process alive)."""

    def __init__(self, grid: Grid, interval: float = DEFAULT_POLL_INTERVAL_S, *,
                 stop: threading.Event | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {interval}")
        self.grid = grid
        self.interval = interval
        self.stop = stop or threading.Event()

    def set_run(self, run: object) -> None:
        self.grid.set_run(run)  # type: ignore[arg-type]

    @property
    def run(self) -> object:  # type: ignore[override]
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> ReplyStream:
        """Flower's contract: push, then pull until every reply is in or ``timeout`` s
        passed (``None``: wait for all); replies of other exchanges are never returned.

        The replies come as a :class:`ReplyStream` that pulls while it is iterated, so a
        strategy that folds each reply into a running sum holds one pull's replies at a
        time, not the round's (issue 18: Flower's own grid returns them as one list)."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        return ReplyStream(self, pending, deadline)


class ReplyStream:
    """The replies to one exchange, pulled from the grid as they are iterated (once).

    The wait for replies happens while the consumer iterates, and its deadline counts from
    the push. ``finished_at`` (``time.perf_counter``) is when the last reply arrived or the
    wait ended: the end of the devices' part of an exchange, for round timing."""

    def __init__(self, grid: PollingGrid, pending: set[str], deadline: float | None) -> None:
        self._grid = grid
        self._pending = pending
        self._deadline = deadline
        self._started = False
        self.finished_at: float | None = None

    def __iter__(self) -> Iterator[Message]:
        if self._started:
            raise RuntimeError("a ReplyStream is iterated once: its replies were consumed")
        self._started = True
        return self._pull()

    def _pull(self) -> Iterator[Message]:
        grid, pending = self._grid, self._pending
        try:
            while pending:
                if grid.stop.is_set():
                    raise RunStopped("the run was stopped while waiting for replies")
                got = list(grid.pull_messages(pending))
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                if not pending:
                    self.finished_at = time.perf_counter()  # before folding the last ones
                yield from got
                del got
                if not pending:
                    break
                if self._deadline is not None:
                    left = self._deadline - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(grid.interval, left))
                else:
                    time.sleep(grid.interval)
        finally:
            if self.finished_at is None:
                self.finished_at = time.perf_counter()
