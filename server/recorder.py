"""What the coordinator keeps of each round: the score, the metrics row, the checkpoint.

Flower's strategy loop calls one ``evaluate_fn`` after every round (and once before the
first); :class:`RoundRecorder` is that function. It scores the global adapter on the
coordinator's held-out blocks, writes the round's line of ``metrics.jsonl`` from the
strategy's :class:`~server.strategy.RoundStats` (and the DP ledger), and checkpoints every
round that ran, so a restarted coordinator resumes after it. The adapter's tensors come
from the strategy (:meth:`~server.strategy.AdapterFedAvg.global_tensors`), decoded once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, MetricRecord

from protocols import keys
from server.checkpoint import ResumePoint, save_checkpoint
from server.client_dp import ClientLevelDP
from server.metrics_log import append_metrics
from server.strategy import AdapterFedAvg

if TYPE_CHECKING:
    from server.central_eval import CentralModel  # torch: only where it is loaded


class RoundRecorder:
    """Flower's ``evaluate_fn`` for one run: score, log and checkpoint each round.

    ``server_round`` is the run's own numbering (resumed runs continue it); ``point`` says
    how many rounds an earlier coordinator completed and where this one started, so the
    checkpoint counts completed rounds across restarts.
    """

    def __init__(self, run_dir: Path, *, central: CentralModel | None,
                 strategy: AdapterFedAvg, dp: ClientLevelDP | None,
                 point: ResumePoint) -> None:
        self.run_dir = run_dir
        self.central = central
        self.strategy = strategy
        self.dp = dp
        self.point = point
        self.started = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        adapter = self.strategy.global_tensors(arrays)
        row: dict[str, Any] = {"round": server_round,
                               "wall_s": time.perf_counter() - self.started}
        eval_start = time.perf_counter()
        if self.central is not None:
            row.update(self.central.evaluate(adapter))
        row["eval_s"] = time.perf_counter() - eval_start
        stats = self.strategy.stats.get(server_round)
        if stats is not None:
            row.update(
                clients=stats.accepted,
                sampled=stats.sampled,
                rejected=stats.rejected,
                failed=stats.failed,
                retries=stats.retries,
                bytes_up=stats.bytes_up,
                bytes_down=stats.bytes_down,
                train_loss=stats.train_loss,
                round_s=stats.aggregated_at - stats.started,
                clients_s=stats.replies_at - stats.started,
                aggregate_s=stats.aggregated_at - stats.replies_at,
                client_train_s=stats.client_train_seconds,
                rejections=stats.rejections,
                dropped=stats.dropped,
                abandoned=stats.abandoned,
                secagg_s=stats.protocol_seconds,
                bytes_up_by_kind=stats.bytes_up_by_kind,
                clients_by_kind=stats.clients_by_kind,
                train_s_by_kind=stats.train_s_by_kind,
                **({"edge_along_last_step": stats.along_last_step}
                   if stats.along_last_step else {}),
                **({"line_search_multiple": stats.line_search_multiple,
                    "line_search_judges": stats.line_search_judges,
                    "judge_bytes_down": stats.judge_bytes_down,
                    "judge_bytes_up": stats.judge_bytes_up}
                   if stats.line_search_multiple is not None else {}),
                **({"line_search_momentum": stats.line_search_momentum}
                   if stats.line_search_momentum is not None else {}),
                **({"kinds_asked": stats.kinds_asked, "judges_drawn": stats.judges_drawn}
                   if stats.kinds_asked or stats.judges_drawn else {}),
            )
        evaluation = self.strategy.evaluations.get(server_round)
        if evaluation is not None:  # Flower runs federated evaluation before this call
            row.update(evaluation.row())
        if self.dp is not None:
            row.update(epsilon=self.dp.ledger.epsilon(), delta=self.dp.ledger.delta,
                       dp_clipped_fraction=self.dp.clip_fractions.get(server_round),
                       dp_stopped_at=self.dp.stopped_at)
        append_metrics(self.run_dir, row)
        if server_round > 0 and stats is not None:  # a round ran: checkpoint it
            completed = self.point.done + server_round - self.point.first_round + 1
            save_checkpoint(self.run_dir, server_round, completed, adapter)
        metrics = {k: v for k, v in row.items() if k in (keys.EVAL_LOSS, keys.PERPLEXITY)}
        return MetricRecord(metrics) if metrics else None
