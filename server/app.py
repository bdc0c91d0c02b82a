"""The fedtune ServerApp: one federated LoRA fine-tuning run on Flower's strategy loop.

``app`` reads the Flower run config (deployment); ``make_server_app`` bakes one in for the
Simulation Engine. Both run :func:`run_coordinator`, so simulation and deployment share
every line of coordinator logic.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from protocols import keys
from protocols.adapter_spec import AdapterSpec, TensorsView
from protocols.atomic_write import write_json_atomic
from protocols.privacy.ledger import PrivacyLedger, load_ledger
from protocols.run_config import PathsSection, RunConfig
from server.checkpoint import OffsetRounds, resume_point, save_checkpoint
from server.client_dp import ClientLevelDP
from server.export import save_peft_adapter
from server.flower_patches import flower_samples_with
from server.metrics_log import append_metrics, truncate_metrics
from server.node_sampling import node_sampler
from server.polling_grid import PollingGrid
from server.secagg import SecAggFedAvg
from server.strategy import AdapterFedAvg

log = logging.getLogger(__name__)

#: FedAvg samples ``max(int(N * fraction), min_train_nodes)`` nodes; a vanishing fraction
#: makes that exactly ``min_train_nodes`` whatever N is (0.0 would disable training).
_SAMPLE_EXACTLY_MIN = 1e-12


def run_coordinator(grid: Grid, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Run all rounds, log metrics each round, export the final adapter; return a summary."""
    from kernels.base_model import resolve_model_dir
    from server.central_eval import CentralModel

    config = RunConfig.from_flat(flat)
    paths = PathsSection.from_flat(flat)
    run_dir = paths.required("run_dir")
    cache_dir = paths.required("cache_dir")

    model_dir = resolve_model_dir(config.model.source, cache_dir)
    central = CentralModel(model_dir, config, threads=os.cpu_count() or 1)
    if config.eval.central:
        n_blocks = central.load_eval_texts(
            paths.required("eval_file"),
            seq_len=config.train.seq_len,
            max_blocks=config.eval.max_blocks,
        )
        log.info("central evaluation on %d held-out blocks of %d tokens", n_blocks,
                 config.train.seq_len)
    frozen = frozenset(k for k in central.initial_adapter if config.lora.is_frozen(k))
    spec = AdapterSpec.from_arrays(central.initial_adapter, central.peft_config, frozen=frozen)
    (run_dir / "adapter_spec.json").write_text(spec.to_json())

    k = config.train.clients_per_round
    privacy = config.privacy
    sampling: dict[str, Any] = dict(
        max_abs_scalar=config.edge.max_abs_scalar,
        max_update_norm=config.security.max_update_norm,
        fraction_train=_SAMPLE_EXACTLY_MIN,
        min_train_nodes=k,
        min_available_nodes=k,
        fraction_evaluate=config.eval.fraction_clients,
        min_evaluate_nodes=1 if config.eval.fraction_clients > 0 else 0,
    )
    security = config.security
    strategy: AdapterFedAvg
    if security.secagg and security.max_update_norm:
        log.warning("security.max_update_norm is not enforced under secure aggregation (the "
                    "coordinator never sees one update); security.secagg_range bounds each "
                    "coordinate instead")
    if security.secagg:
        strategy = SecAggFedAvg(
            spec,
            codec=config.federation.codec,
            threshold_fraction=security.secagg_threshold,
            clip_range=security.secagg_range,
            modulus_bits=security.secagg_modulus_bits,
            stage_timeout_s=security.secagg_stage_timeout_s,
            dp_clip_norm=privacy.clip_norm if privacy.client_dp else 0.0,
            dp_noise_multiplier=privacy.noise_multiplier if privacy.client_dp else 0.0,
            **sampling,
        )
    else:
        strategy = AdapterFedAvg(
            spec,
            codec=config.federation.codec,
            weighting="uniform" if privacy.client_dp else "examples",
            **sampling,
        )
    dp: ClientLevelDP | None = None
    ledger_path = run_dir / "privacy_ledger.json"
    ledger = (load_ledger(ledger_path) if ledger_path.exists()  # a restarted coordinator
              else PrivacyLedger(accountant=privacy.accountant, delta=privacy.delta))
    point = resume_point(run_dir, max((e.round for e in ledger.history), default=0))
    if point.done:
        log.info("resuming after round %d (%d of %d rounds done); next round is %d",
                 point.last_round, point.done, config.train.rounds, point.first_round)
        truncate_metrics(run_dir, point.last_round)
    if privacy.client_dp:
        dp = ClientLevelDP(
            strategy,
            clip_norm=privacy.clip_norm,
            noise_multiplier=privacy.noise_multiplier,
            clients_per_round=k,
            ledger=ledger,
            epsilon_budget=privacy.epsilon_budget,
            ledger_path=ledger_path,
            distributed=security.secagg,
        )
    t0 = time.perf_counter()
    outer = OffsetRounds(dp or strategy, point.first_round - 1)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        row: dict[str, Any] = {"round": server_round, "wall_s": time.perf_counter() - t0}
        eval_start = time.perf_counter()
        if config.eval.central:
            row.update(central.evaluate(strategy.global_tensors(arrays)))
        row["eval_s"] = time.perf_counter() - eval_start
        stats = strategy.stats.get(server_round)
        if stats is not None:
            row.update(
                clients=stats.accepted,
                sampled=stats.sampled,
                rejected=stats.rejected,
                failed=stats.failed,
                bytes_up=stats.bytes_up,
                bytes_down=stats.bytes_down,
                train_loss=stats.train_loss,
                round_s=stats.aggregated_at - stats.started,
                clients_s=stats.replies_at - stats.started,
                aggregate_s=stats.aggregated_at - stats.replies_at,
                client_train_s=stats.client_train_seconds,
                rejections=stats.rejections,
                dropped=stats.dropped,
                secagg_s=stats.protocol_seconds,
                bytes_up_by_kind=stats.bytes_up_by_kind,
                clients_by_kind=stats.clients_by_kind,
            )
        if dp is not None:
            row.update(epsilon=dp.ledger.epsilon(), delta=dp.ledger.delta,
                       dp_clipped_fraction=dp.clip_fractions.get(server_round),
                       dp_stopped_at=dp.stopped_at)
        append_metrics(run_dir, row)
        if server_round > 0 and server_round in strategy.stats:  # a round ran: checkpoint it
            completed = point.done + server_round - outer.offset
            save_checkpoint(run_dir, server_round, completed, strategy.global_tensors(arrays))
        metrics = {k: v for k, v in row.items() if k in (keys.EVAL_LOSS, keys.PERPLEXITY)}
        return MetricRecord(metrics) if metrics else None

    train_config = ConfigRecord(
        {
            keys.LOCAL_STEPS: config.train.local_steps,
            keys.BATCH_SIZE: config.train.batch_size,
            keys.LEARNING_RATE: config.train.learning_rate,
            keys.SEQ_LEN: config.train.seq_len,
            keys.SEED: config.train.seed,
        }
    )
    if config.edge.fraction > 0:  # what edge (forward-only) clients use instead
        train_config[keys.EDGE_LOCAL_STEPS] = config.edge.local_steps
        train_config[keys.EDGE_LEARNING_RATE] = config.edge.learning_rate
        train_config[keys.EDGE_CODEC] = "fp32" if config.edge.upload == "dense" else "seed-scalar"
    eval_config = ConfigRecord(
        {keys.SEQ_LEN: config.train.seq_len, keys.BATCH_SIZE: config.eval.batch_size}
    )
    start = point.adapter if point.adapter is not None else central.initial_adapter
    remaining = config.train.rounds - point.done
    final: TensorsView = start
    if remaining > 0:
        # Seeded sampling repeats runs; under client-level DP the sample must be secret.
        with flower_samples_with(node_sampler(config.train.seed,
                                              secret=config.privacy.client_dp)):
            result = outer.start(
                grid=grid,
                initial_arrays=strategy.publish(start),
                num_rounds=remaining,
                timeout=config.federation.round_timeout_s,
                train_config=train_config,
                evaluate_config=eval_config,
                evaluate_fn=outer.shift(evaluate),
            )
        final = strategy.global_tensors(result.arrays) if result.arrays else start
    save_peft_adapter(run_dir / "adapter", final, central.peft_config)
    summary: dict[str, Any] = {"rounds": config.train.rounds,
                               "seconds": time.perf_counter() - t0}
    if dp is not None:
        summary.update(epsilon=dp.ledger.epsilon(), delta=dp.ledger.delta,
                       stopped_at=dp.stopped_at)
    write_json_atomic(run_dir / "coordinator_summary.json", summary, indent=2, sort_keys=True)
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose settings are ``run_config`` over Flower's own run config."""
    baked = dict(run_config or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = {**dict(context.run_config), **baked}
        interval = RunConfig.from_flat(flat).federation.poll_interval_s
        run_coordinator(PollingGrid(grid, interval), flat)

    return app


app = make_server_app()
