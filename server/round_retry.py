"""Rounds whose devices all failed run again, with a fresh sample, a bounded number of times.

A round can end without an update although nothing is wrong with the run: the sampled
devices went offline, a simulation's workers were killed by the out-of-memory killer and
are still restarting, or too many dropped out for secure aggregation's threshold. Flower's
strategy loop would move on to the next round with the global adapter unchanged, so the run
silently trains fewer rounds than it was asked to. :class:`RetryFailedRounds` catches such a
round in ``aggregate_train`` — no update, at least one failed device — and runs it again
under the same round number (configure, send, aggregate; for secure aggregation that is every
stage) with devices sampled afresh from (seed, round, attempt), up to
``federation.round_retries`` times. Failures and rejections of every attempt are counted in
the round's :class:`~server.strategy.RoundStats` (``retries`` says how many attempts were
added), so ``metrics.jsonl`` and the report stay true. A round whose updates were all
*rejected* (invalid, stale) is not retried: that is the coordinator refusing what devices
sent, not devices failing.

Flower has no way to repeat a round number from outside its loop, so the retry happens
inside the strategy's ``aggregate_train``, with the grid and instruction the round was
configured with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.strategy import AdapterFedAvg, RoundStats, StrategyWrapper

log = logging.getLogger(__name__)


class RetryFailedRounds(StrategyWrapper[Strategy]):
    """``strategy`` with rounds that trained nothing because devices failed run again.

    ``averaging`` is the :class:`AdapterFedAvg` at the bottom of ``strategy`` (its per-round
    stats say why a round trained nothing); ``on_attempt(round, attempt)`` reseeds the device
    sampler before each retry; ``timeout`` is the round timeout of the run."""

    def __init__(self, strategy: Strategy, averaging: AdapterFedAvg, *, retries: int,
                 timeout: float, on_attempt: Callable[[int, int], None] | None = None) -> None:
        super().__init__(strategy)
        self.averaging = averaging
        self.retries = retries
        self.timeout = timeout
        self.on_attempt = on_attempt
        self._configured: tuple[ArrayRecord, ConfigRecord, Grid] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._configured = (arrays, config, grid)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = self.strategy.aggregate_train(server_round, replies)
        attempt = 0
        failed = devices_failed(self.averaging.stats.get(server_round))
        while result[0] is None and attempt < self.retries and failed:
            assert self._configured is not None
            arrays, config, grid = self._configured
            before = self.averaging.stats[server_round]
            attempt += 1
            log.warning("round %d trained nothing (%d devices failed): sampling devices again, "
                        "attempt %d of %d", server_round, before.failed, attempt, self.retries)
            if self.on_attempt is not None:
                self.on_attempt(server_round, attempt)
            messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
            after = self.averaging.stats.get(server_round)
            if after is None or after is before:
                break  # the strategy declined to run the round (e.g. a DP budget stop)
            replies = grid.send_and_receive(messages, timeout=self.timeout) if messages else []
            result = self.strategy.aggregate_train(server_round, replies)
            failed = devices_failed(after)  # this attempt's own counts, before merging
            carry_over(before, after, attempt)
        return result


def devices_failed(stats: RoundStats | None) -> bool:
    """Whether an attempt trained nothing because devices failed (not because the
    coordinator rejected what they sent, nor because it sampled nobody)."""
    return stats is not None and stats.accepted == 0 and stats.failed > 0


def carry_over(before: RoundStats, after: RoundStats, attempt: int) -> None:
    """Count the earlier attempts of a round in the stats of its last attempt: every failure,
    rejection and byte, and the time since the round first started."""
    after.retries = attempt
    after.sampled += before.sampled
    after.failed += before.failed
    after.rejected += before.rejected
    after.rejections[:0] = before.rejections
    after.dropped += before.dropped
    after.bytes_down += before.bytes_down
    after.bytes_up += before.bytes_up
    for kind, nbytes in before.bytes_up_by_kind.items():
        after.bytes_up_by_kind[kind] = after.bytes_up_by_kind.get(kind, 0) + nbytes
    for kind, count in before.clients_by_kind.items():
        after.clients_by_kind[kind] = after.clients_by_kind.get(kind, 0) + count
    for kind, seconds in before.train_s_by_kind.items():
        after.train_s_by_kind[kind] = after.train_s_by_kind.get(kind, 0.0) + seconds
    after.client_train_seconds[:0] = before.client_train_seconds
    if after.accepted == 0 and after.abandoned is None:
        after.abandoned = before.abandoned  # still says why the round trained nothing
    after.protocol_seconds += before.protocol_seconds
    after.started = before.started
