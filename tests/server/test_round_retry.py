"""A retried round keeps every attempt's count, and samples afresh but reproducibly."""

from __future__ import annotations

from server.node_sampling import RoundSampler
from server.round_retry import carry_over
from server.strategy import RoundStats


def test_the_last_attempt_counts_every_earlier_failure() -> None:
    first = RoundStats(sampled=2, failed=2, bytes_down=100, started=5.0, protocol_seconds=1.5,
                       rejected=1, rejections=["node 7: stale"], dropped=1,
                       bytes_up_by_kind={"torch": 30}, clients_by_kind={"torch": 1},
                       abandoned="only 1 nodes sent masked inputs")
    last = RoundStats(sampled=2, accepted=2, bytes_down=100, bytes_up=40, started=9.0,
                      protocol_seconds=0.5, rejections=["node 3: too large"], rejected=1)
    carry_over(first, last, attempt=1)
    assert (last.retries, last.sampled, last.failed, last.accepted) == (1, 4, 2, 2)
    assert (last.rejected, last.rejections) == (2, ["node 7: stale", "node 3: too large"])
    assert (last.bytes_down, last.bytes_up, last.dropped) == (200, 40, 1)
    assert last.started == 5.0 and last.protocol_seconds == 2.0
    assert last.bytes_up_by_kind == {"torch": 30} and last.clients_by_kind == {"torch": 1}
    assert last.abandoned is None  # the last attempt trained: nothing was abandoned
    idle = RoundStats(sampled=2, failed=2)
    carry_over(first, idle, attempt=2)
    assert idle.abandoned == "only 1 nodes sent masked inputs"  # why it trained nothing


def test_a_retry_samples_other_devices_reproducibly() -> None:
    nodes = list(range(100))

    def sample(server_round: int, attempt: int) -> list[int]:
        sampler = RoundSampler(seed=3)
        sampler.begin_round(server_round, attempt)
        return sampler.sample(nodes, 5)

    assert sample(4, 0) == sample(4, 0)
    assert sample(4, 1) == sample(4, 1)
    assert sample(4, 1) != sample(4, 0) and sample(4, 2) != sample(4, 1)
    # the first attempt of a round samples as before retries existed
    plain = RoundSampler(seed=3)
    plain.begin_round(4)
    assert plain.sample(nodes, 5) == sample(4, 0)
