"""PollingGrid: Flower's send_and_receive contract with our polling interval.

The grid below is a stand-in for the SuperLink's message store (replies become available
after a number of pulls); the real grids are exercised by the simulation and deployment
end-to-end tests, whose ServerApp always runs behind a PollingGrid.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict

from server.polling_grid import PollingGrid


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class SlowStore:
    """Push stores messages; a reply to message i appears after ``ready[i]`` pulls."""

    def __init__(self, ready: list[int]) -> None:
        self.ready = ready
        self.pulls = 0
        self.sent: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        out = []
        for mid in message_ids:
            if self.pulls >= self.ready[int(mid[1:])]:
                out.append(Message(RecordDict(), reply_to=self.sent[mid]))
        return out


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(n)]


def test_waits_for_every_reply_polling_at_its_interval() -> None:
    store = SlowStore(ready=[1, 3, 5])
    grid = PollingGrid(store, interval=0.01)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(_messages(3), timeout=None))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert store.pulls == 5  # no pull after the last reply, none skipped


def test_returns_what_arrived_when_the_timeout_passes() -> None:
    store = SlowStore(ready=[1, 10**9])
    grid = PollingGrid(store, interval=0.02)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive(_messages(2), timeout=0.5))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 2 <= store.pulls <= 27  # it kept polling, at most every 0.02 s, then stopped


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="poll interval must be > 0"):
        PollingGrid(SlowStore([]), interval=0)  # type: ignore[arg-type]


def test_replies_are_pulled_while_the_consumer_iterates() -> None:
    """The stream hands each pull's replies to the consumer before pulling again, so an
    aggregator that folds as it reads never holds the round's replies at once; the deadline
    counts from the push; the stream is iterated once, and says when the last reply came."""
    store = SlowStore(ready=[1, 2, 3])
    grid = PollingGrid(store, interval=0.01)  # type: ignore[arg-type]
    stream = grid.send_and_receive(_messages(3), timeout=None)
    assert store.pulls == 0 and stream.finished_at is None  # pushed, nothing pulled yet
    seen = []
    for reply in stream:
        seen.append((reply.metadata.reply_to_message_id, store.pulls))
    assert seen == [("m0", 1), ("m1", 2), ("m2", 3)]  # each reply before the next pull
    assert stream.finished_at is not None
    with pytest.raises(RuntimeError, match="iterated once"):
        list(stream)


def test_a_stopped_run_ends_the_stream() -> None:
    import threading

    from server.polling_grid import RunStopped

    stop = threading.Event()
    store = SlowStore(ready=[1, 10**9])
    grid = PollingGrid(store, interval=0.01, stop=stop)  # type: ignore[arg-type]
    stream = iter(grid.send_and_receive(_messages(2), timeout=None))
    assert next(stream).metadata.reply_to_message_id == "m0"
    stop.set()
    with pytest.raises(RunStopped):
        next(stream)
