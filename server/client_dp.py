"""Client-level differential privacy on the coordinator, with an ε ledger and a budget.

Each round, every client's update (the delta it uploaded) is clipped to L2 norm ``C``; the
clipped updates are summed, Gaussian noise of std ``σ·C`` is added to the sum, and the sum is
divided by the *expected* cohort size ``m = clients_per_round`` — a fixed number, never the
count of updates that arrived (dropouts and rejections depend on the devices and their data;
McMahan et al. 2018's fixed-denominator estimator, as in Flower's and TensorFlow Federated's
DP aggregators). The round is recorded in a :class:`~protocols.privacy.ledger.PrivacyLedger`
as one step of the subsampled Gaussian mechanism with ``q = clients_per_round / available
clients``, which with ``privacy.client_sampling = "poisson"`` is exactly how the round sampled
(:mod:`server.node_sampling`). A configured ε budget is checked *before* a round is started: a
round that would exceed it is not run.

Every round the accountant counts releases an update, also when no device's update was
accepted because the Poisson sample was empty or every update was rejected: the noise alone
is then added. Skipping such a round would tell whoever sees the global adapter that the
sample was empty, which the mechanism's analysis does not allow for. A round in which
sampled devices *failed* (lost workers, devices offline) releases and spends nothing: it
runs again with a fresh, independent sample (:mod:`server.round_retry`), and only the
attempt that releases is accounted. Under secure aggregation (``distributed``) the devices
add the noise, so a round that recovered no sum releases nothing and spends nothing; the
coordinator there knows the sample anyway.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping``: in Flower 1.41 it pairs
reply arrays with the global ones by position, so it breaks when clients upload a subset
of the adapter (FFA-LoRA uploads B only), clips before our validation (a NaN update would be
"clipped" rather than rejected), and keeps its own accountant that knows nothing of our
persisted ledger. This wrapper keeps Flower's shape — it wraps any :class:`AdapterFedAvg`
and changes only the train path — and fails closed: it refuses an example-weighted inner
strategy, whose weights would break the sensitivity bound.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from protocols.privacy.ledger import PrivacyLedger, save_ledger
from server.round_retry import devices_failed
from server.strategy import AdapterFedAvg, StrategyWrapper

log = logging.getLogger(__name__)


class ClientLevelDP(StrategyWrapper[AdapterFedAvg]):
    """DP-FedAvg around an :class:`AdapterFedAvg` with uniform weighting."""

    def __init__(
        self,
        strategy: AdapterFedAvg,
        *,
        clip_norm: float,
        noise_multiplier: float,
        clients_per_round: int,
        ledger: PrivacyLedger,
        epsilon_budget: float = 0.0,
        ledger_path: Path | None = None,
        seed: int | None = None,
        distributed: bool = False,
    ) -> None:
        """``distributed=True``: the clients clip and add the noise themselves (under secure
        aggregation the coordinator never holds an individual update to clip); this wrapper
        then only enforces the budget and keeps the ledger."""
        if strategy.weighting != "uniform":
            raise ValueError("client-level DP needs the inner strategy to average with "
                             "weighting='uniform'; example weights change the sensitivity")
        super().__init__(strategy)
        # The sum is divided by the expected cohort size, never by how many updates arrived.
        strategy.denominator = clients_per_round
        if not distributed:
            # The inner strategy clips each validated delta (server.strategy): clipping
            # belongs after validation, and there each reply is decoded once.
            strategy.clip_norm = clip_norm
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.clients_per_round = clients_per_round
        self.ledger = ledger
        self.epsilon_budget = epsilon_budget
        self.ledger_path = ledger_path
        self.distributed = distributed
        self.stopped_at: int | None = None
        self.clip_fractions: dict[int, float] = {}
        self._rng = np.random.default_rng(seed)  # noise; seed only in tests
        self._rates: dict[int, float] = {}

    # -- train path ---------------------------------------------------------------------
    def begin_round(self, server_round: int, num_nodes: int) -> bool:
        """Decide whether the round may run under the budget; remember its sampling rate."""
        rate = min(1.0, self.clients_per_round / max(num_nodes, 1))
        if self.epsilon_budget and self.ledger.would_exceed(
            self.epsilon_budget, noise_multiplier=self.noise_multiplier, sample_rate=rate
        ):
            if self.stopped_at is None:
                self.stopped_at = server_round
                log.warning(
                    "round %d not run: it would take epsilon from %.3f past the budget %.3f; "
                    "training stops here and the current adapter is final",
                    server_round, self.ledger.epsilon(), self.epsilon_budget,
                )
            return False
        self._rates[server_round] = rate
        return True

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopped_at is not None or not self.begin_round(
            server_round, len(list(grid.get_node_ids()))
        ):
            return []
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if server_round not in self._rates:
            return None, None  # the round was not run
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        stats = self.strategy.stats.get(server_round)
        accepted = stats.accepted if stats is not None else 0
        if self.distributed and (arrays is None or accepted == 0):
            return None, None  # no sum recovered: nothing released, nothing spent
        if devices_failed(stats):
            # Sampled devices failed (lost workers, offline): nothing is released or spent,
            # and the round may run again with a fresh, independent sample
            # (server.round_retry); only the attempt that releases is accounted.
            return None, None
        # Every delta was clipped to C (by the inner strategy, or under SecAgg by each client
        # before masking, with its share of the noise: the sum then carries at least std
        # sigma*C, see server/secagg.py); the sum divided by m gets std sigma*C/m.
        std = self.noise_multiplier * self.clip_norm / self.clients_per_round
        if not self.distributed:
            # The inner strategy's mean (sum / m), or the round's global adapter when no
            # update was accepted: the noise alone is released then.
            base = (self.strategy.global_tensors(arrays) if arrays is not None
                    else self.strategy.current_global)
            mean = dict(base)
            for key in self.strategy.spec.trainable_keys:
                noise = self._rng.normal(0.0, std, size=mean[key].shape)
                mean[key] = (mean[key].astype(np.float64) + noise).astype(np.float32)
            arrays = self.strategy.publish(mean)
            if stats is not None and accepted:
                self.clip_fractions[server_round] = stats.clipped / accepted
            else:
                log.warning("round %d: no update accepted; the noise alone is released (the "
                            "accountant counts every round)", server_round)
        self.ledger.record(server_round, noise_multiplier=self.noise_multiplier,
                           sample_rate=self._rates[server_round])
        if self.ledger_path is not None:
            save_ledger(self.ledger_path, self.ledger)
        log.info("round %d: DP noise std %.3g on the sum of %d clipped updates / %d; "
                 "epsilon %.3f (delta %g)", server_round, std, accepted, self.clients_per_round,
                 self.ledger.epsilon(), self.ledger.delta)
        return arrays, metrics

    # -- evaluation passes through (StrategyWrapper) --------------------------------------
    def summary(self) -> None:
        super().summary()
        log.info("\t└──> client-level DP: clip %.3g, noise multiplier %.3g, budget %s",
                 self.clip_norm, self.noise_multiplier, self.epsilon_budget or "none")
