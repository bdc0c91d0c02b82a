"""The fedtune ServerApp: one federated LoRA fine-tuning run on Flower's strategy loop.

``app`` reads the Flower run config (deployment); ``make_server_app`` bakes one in for the
Simulation Engine. Both run :func:`run_coordinator`, so simulation and deployment share
every line of coordinator logic.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from protocols import keys
from protocols.adapter_spec import AdapterSpec, TensorsView
from protocols.atomic_write import write_json_atomic
from protocols.entry_point import log_to_stderr
from protocols.privacy.ledger import PrivacyLedger, load_ledger
from protocols.run_config import ConfigError, PathsSection, RunConfig
from protocols.secagg.fixed_point import QUANTIZED_LEVELS, quantized_modulus_bits
from server.checkpoint import OffsetRounds, resume_point
from server.client_dp import ClientLevelDP
from server.export import save_peft_adapter
from server.flower_patches import flower_samples_with
from server.metrics_log import read_metrics, truncate_metrics
from server.node_sampling import node_sampler
from server.polling_grid import PollingGrid
from server.recorder import RoundRecorder
from server.round_retry import RetryFailedRounds
from server.secagg import SecAggFedAvg
from server.strategy import AdapterFedAvg

log = logging.getLogger(__name__)

#: FedAvg samples ``max(int(N * fraction), min_train_nodes)`` nodes; a vanishing fraction
#: makes that exactly ``min_train_nodes`` whatever N is (0.0 would disable training).
_SAMPLE_EXACTLY_MIN = 1e-12


def federated_eval_fraction(config: RunConfig, *, central: bool) -> float:
    """Share of the devices asked to evaluate on their own held-out data each round:
    ``eval.fraction_clients``; or, when ``eval.central`` asks for evaluation but the
    coordinator has no evaluation data of its own (``eval.path``), every connected device,
    except under client-level DP, where a device's held-out loss is a number the DP
    guarantee does not cover."""
    if config.eval.fraction_clients > 0 or central or not config.eval.central:
        return config.eval.fraction_clients
    if config.privacy.client_dp:
        log.warning("no central evaluation data (eval.path) and client-level DP is on: the "
                    "devices' held-out losses are not covered by DP, so nothing is evaluated; "
                    "set eval.path to a file this coordinator owns")
        return 0.0
    log.info("no eval.path: the global adapter is evaluated on every connected device's own "
             "held-out data each round (federated evaluation)")
    return 1.0


def upload_codec(config: RunConfig, spec: AdapterSpec) -> str:
    """The codec torch clients upload with, checked against the per-device budget
    (``federation.max_upload_bytes``) before round 1: ``auto`` picks the most precise one
    that fits; a codec that can never fit, or a masked SecAgg upload over the budget, is
    refused here rather than by rejecting every reply."""
    from protocols.upload_budget import choose_codec, upload_size

    budget, codec = round_upload_budget(config), config.federation.codec
    limit = (f"the per-round upload budget of {budget} bytes (federation.max_upload_bytes, "
             "or max_run_upload_bytes / train.rounds)")
    shapes = {k: spec.tensors[k].shape for k in sorted(spec.trainable_keys)}
    every = sorted(spec.tensors)
    if config.security.secagg:  # the upload is the masked vector: its size is known now
        length = sum(int(np.prod(s)) for s in shapes.values())
        n = config.train.clients_per_round
        sizes = {c: masked_upload_size(length, secagg_modulus_bits(config, c, n))
                 for c in ("fp32", *QUANTIZED_LEVELS)}
        if codec == "auto":
            fits = [c for c in sizes if not budget or sizes[c] <= budget]
            codec = fits[0] if fits else "int2"
            log.info("federation.codec = 'auto' under secure aggregation: %s (%d bytes per "
                     "masked upload%s)", codec, sizes[codec], f", budget {budget}" if budget
                     else "")
        if budget and sizes[codec] > budget:
            raise ConfigError(
                f"{limit}: a masked secure-aggregation upload of this adapter with codec "
                f"{codec!r} is {sizes[codec]} bytes "
                f"(the smallest, int2: {sizes['int2']}); raise the budget, train fewer "
                "coordinates, or choose a smaller codec")
        return codec
    if budget and config.edge.fraction > 0 and config.edge.upload != "seed-scalar" and (
            (dense := upload_size(edge_codec(config), shapes, every)) > budget):
        raise ConfigError(
            f"edge devices upload their dense delta (edge.upload = {config.edge.upload!r}): "
            f"{dense} "
            f"bytes, over {limit}; raise the budget or let "
            "edge devices send seeds and scalars (edge.upload = 'seed-scalar')")
    if codec == "auto":
        codec = choose_codec(budget, shapes, adapter_keys=every)
        log.info("federation.codec = 'auto': %s (%d bytes per upload%s)", codec,
                 upload_size(codec, shapes, every), f", budget {budget}" if budget else "")
    elif budget and (size := upload_size(codec, shapes, every)) > budget:
        raise ConfigError(
            f"federation.codec = {codec!r} uploads {size} bytes per device, over "
            f"{limit}; choose a smaller codec or 'auto'")
    return codec


def edge_codec(config: RunConfig) -> str:
    """The codec edge devices upload with: seeds and scalars, or their dense delta (fp32
    for 'dense', else the lossy codec ``edge.upload`` names)."""
    return "fp32" if config.edge.upload == "dense" else config.edge.upload


def round_upload_budget(config: RunConfig) -> int:
    """Bytes one device may upload in a round: the tighter of ``max_upload_bytes`` and its
    share of ``max_run_upload_bytes`` if sampled every round (0: no limit)."""
    federation = config.federation
    limits = [federation.max_upload_bytes] if federation.max_upload_bytes else []
    if federation.max_run_upload_bytes:
        share = federation.max_run_upload_bytes // config.train.rounds
        if share == 0:
            raise ConfigError(
                f"federation.max_run_upload_bytes = {federation.max_run_upload_bytes} leaves "
                f"less than a byte per round over train.rounds = {config.train.rounds}; raise "
                "it (or set 0 for no limit)")
        limits.append(share)
    return min(limits, default=0)


def secagg_modulus_bits(config: RunConfig, codec: str, num_clients: int) -> int:
    """The masking modulus of a round of ``num_clients`` with ``codec``: the configured one
    for exact uploads, the fewest bits that hold the sum of the codes for quantized ones."""
    if codec in QUANTIZED_LEVELS:
        return quantized_modulus_bits(num_clients, QUANTIZED_LEVELS[codec])
    return config.security.secagg_modulus_bits


def masked_upload_size(length: int, modulus_bits: int) -> int:
    """Bytes of a masked vector of ``length`` coordinates as it travels."""
    from protocols.codecs import record_nbytes
    from protocols.secagg.fixed_point import uint_dtype
    from protocols.secagg.wire import masked_record

    return record_nbytes(masked_record(np.zeros(length, uint_dtype(modulus_bits)), modulus_bits))


def secagg_quant_range(config: RunConfig) -> float:
    """``security.secagg_quant_range``, or its auto value: local steps x learning rate (the
    furthest Adam's per-step-bounded moves take a weight in a round), for the torch and, when
    there are any, the edge devices."""
    if config.security.secagg_quant_range > 0:
        return config.security.secagg_quant_range
    reach = config.train.local_steps * config.train.learning_rate
    if config.edge.fraction > 0:
        reach = max(reach, config.edge.local_steps * config.edge.learning_rate)
    return reach


def build_strategy(config: RunConfig, spec: AdapterSpec, *, ledger: PrivacyLedger,
                   ledger_path: Path, eval_fraction: float | None = None, roster: str = ""
                   ) -> tuple[AdapterFedAvg, ClientLevelDP | None]:
    """The strategy stack the config asks for: FedAvg over adapter deltas (with secure
    aggregation when ``security.secagg``), wrapped in client-level DP when
    ``privacy.client_dp``. Returns the averaging strategy and the DP wrapper, if any.
    ``eval_fraction`` overrides ``eval.fraction_clients`` (see
    :func:`federated_eval_fraction`); ``roster`` (the organisation's signed roster) makes
    secure aggregation authenticated."""
    k = config.train.clients_per_round
    fraction_evaluate = (config.eval.fraction_clients if eval_fraction is None
                         else eval_fraction)
    privacy, security = config.privacy, config.security
    sampling: dict[str, Any] = dict(
        max_abs_scalar=config.edge.max_abs_scalar,
        max_update_norm=security.max_update_norm,
        max_upload_bytes=config.federation.max_upload_bytes,
        max_run_upload_bytes=config.federation.max_run_upload_bytes,
        server_learning_rate=config.train.server_learning_rate,
        line_search=config.edge.line_search if config.edge.fraction > 0 else (),
        line_search_blocks=config.edge.line_search_blocks,
        line_search_momentum=(config.edge.line_search_momentum if config.edge.fraction > 0
                              else ()),
        edge_role=config.edge.role if config.edge.fraction > 0 else "train",
        judges=config.edge.judges if config.edge.fraction > 0 else 0,
        fraction_train=_SAMPLE_EXACTLY_MIN,
        min_train_nodes=k,
        min_available_nodes=k,
        fraction_evaluate=fraction_evaluate,
        min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
    )
    codec = upload_codec(config, spec)
    strategy: AdapterFedAvg
    if security.secagg:
        if security.max_update_norm:
            log.warning("security.max_update_norm is not enforced under secure aggregation "
                        "(the coordinator never sees one update); security.secagg_range "
                        "bounds each coordinate instead")
        strategy = SecAggFedAvg(
            spec,
            codec=codec,
            threshold_fraction=security.secagg_threshold,
            clip_range=security.secagg_range,
            modulus_bits=security.secagg_modulus_bits,
            dp_clip_norm=privacy.clip_norm if privacy.client_dp else 0.0,
            dp_noise_multiplier=privacy.noise_multiplier if privacy.client_dp else 0.0,
            roster=roster,
            quant_range=secagg_quant_range(config),
            neighbours=security.secagg_neighbours,
            stage_timeout_s=security.secagg_stage_timeout_s,
            **sampling,
        )
        if roster:
            log.info("secure aggregation is authenticated: devices sign their keys with "
                     "identity keys of the organisation's roster and the survivor list before "
                     "unmasking (a lying coordinator cannot substitute keys or split lists)")
        else:
            log.warning("secure aggregation is not authenticated (no roster of devices): it "
                        "protects against a curious coordinator, not one that lies; see the "
                        "README's threat model")
    else:
        strategy = AdapterFedAvg(
            spec,
            codec=codec,
            weighting="uniform" if privacy.client_dp else "examples",
            edge_combine=config.edge.combine,
            stage_timeout_s=security.secagg_stage_timeout_s,
            **sampling,
        )
    if not privacy.client_dp:
        return strategy, None
    return strategy, ClientLevelDP(
        strategy,
        clip_norm=privacy.clip_norm,
        noise_multiplier=privacy.noise_multiplier,
        clients_per_round=k,
        ledger=ledger,
        epsilon_budget=privacy.epsilon_budget,
        ledger_path=ledger_path,
        distributed=security.secagg,
    )


def instructions(config: RunConfig) -> tuple[ConfigRecord, ConfigRecord]:
    """What every train and evaluate message tells the devices (besides the adapter)."""
    train = ConfigRecord(
        {
            keys.LOCAL_STEPS: config.train.local_steps,
            keys.BATCH_SIZE: config.train.batch_size,
            keys.LEARNING_RATE: config.train.learning_rate,
            keys.SEQ_LEN: config.train.seq_len,
            keys.SEED: config.train.seed,
        }
    )
    if config.privacy.client_dp:  # devices then report no number of their own in clear
        train[keys.CLIENT_DP] = True
    if config.edge.fraction > 0:  # what edge (forward-only) clients use instead
        train[keys.EDGE_LOCAL_STEPS] = config.edge.local_steps
        train[keys.EDGE_LEARNING_RATE] = config.edge.learning_rate
        train[keys.EDGE_CODEC] = edge_codec(config)
        train[keys.EDGE_SUBSPACE] = config.edge.subspace
    evaluate = ConfigRecord(
        {keys.SEQ_LEN: config.train.seq_len, keys.BATCH_SIZE: config.eval.batch_size}
    )
    return train, evaluate


def run_coordinator(grid: Grid, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Build the strategy, start it; export the final adapter; return a summary."""
    from kernels.base_model import resolve_model_dir
    from server.central_eval import CentralModel

    config = RunConfig.from_flat(flat)
    paths = PathsSection.from_flat(flat)
    run_dir = paths.required("run_dir")
    model_dir = resolve_model_dir(config.model.source, paths.required("cache_dir"))
    central = CentralModel(model_dir, config, threads=os.cpu_count() or 1)
    # Only data the coordinator owns: eval.path (a simulation names its own held-out sample).
    central_on = config.eval.central and config.eval.path is not None
    if central_on:
        assert config.eval.path is not None
        n_blocks = central.load_eval_data(config.eval.path, seq_len=config.train.seq_len,
                                          max_blocks=config.eval.max_blocks)
        log.info("central evaluation on %d held-out blocks of %d tokens from %s", n_blocks,
                 config.train.seq_len, config.eval.path)
    frozen = frozenset(k for k in central.initial_adapter if config.lora.is_frozen(k))
    spec = AdapterSpec.from_arrays(central.initial_adapter, central.peft_config, frozen=frozen)
    (run_dir / "adapter_spec.json").write_text(spec.to_json())

    ledger_path = run_dir / "privacy_ledger.json"
    ledger = (load_ledger(ledger_path) if ledger_path.exists()  # a restarted coordinator
              else PrivacyLedger(accountant=config.privacy.accountant,
                                 delta=config.privacy.delta))
    if ledger.accountant != config.privacy.accountant:
        # The saved ledger's accountant would account the rounds still to come: one that
        # does not cover their mechanism (Skellam rounds need 'rdp-general') must not.
        raise ConfigError(
            f"{ledger_path} was kept with accountant {ledger.accountant!r}, but the run's "
            f"config says privacy.accountant = {config.privacy.accountant!r}; resume with "
            f"the ledger's accountant, or start a new run directory")
    point = resume_point(run_dir, max((e.round for e in ledger.history), default=0))
    if point.done:
        log.info("resuming after round %d (%d of %d rounds done); next round is %d",
                 point.last_round, point.done, config.train.rounds, point.first_round)
    # A reopened run keeps only the rows of checkpointed rounds (and its round 0): a round
    # logged but not checkpointed runs again.
    truncate_metrics(run_dir, point.last_round)
    base_logged = any(r.get("round") == 0 for r in read_metrics(run_dir))
    strategy, dp = build_strategy(config, spec, ledger=ledger, ledger_path=ledger_path,
                                  eval_fraction=federated_eval_fraction(config,
                                                                        central=central_on),
                                  roster=paths.secagg_roster)
    # Seeded sampling repeats runs (round by round, so a resumed run too); under client-level
    # DP the sample must be secret.
    sampler = node_sampler(config.train.seed, secret=config.privacy.client_dp,
                           poisson=config.privacy.poisson_sampling(
                               secagg=config.security.secagg))
    strategy.node_sampler = sampler  # edge.role = 'judge' / edge.judges draw with it too
    retrying = RetryFailedRounds(dp or strategy, strategy,
                                 retries=config.federation.round_retries,
                                 timeout=config.federation.round_timeout_s,
                                 on_attempt=sampler.begin_round)
    outer = OffsetRounds(retrying, point.first_round - 1, on_round=sampler.begin_round)
    recorder = RoundRecorder(run_dir, central=central if central_on else None,
                             strategy=strategy, dp=dp, point=point)
    train_config, eval_config = instructions(config)

    final: TensorsView = point.adapter if point.adapter is not None else central.initial_adapter
    remaining = config.train.rounds - point.done
    if remaining > 0:
        with flower_samples_with(sampler):
            result = outer.start(
                grid=grid,
                initial_arrays=strategy.publish(final),
                num_rounds=remaining,
                timeout=config.federation.round_timeout_s,
                train_config=train_config,
                evaluate_config=eval_config,
                evaluate_fn=outer.shift(recorder, skip_initial=base_logged),
            )
        if result.arrays:
            final = strategy.global_tensors(result.arrays)
    save_peft_adapter(run_dir / "adapter", final, central.peft_config)
    if central_on and config.eval.generate > 0:
        from server.generation_eval import write_generations

        write_generations(run_dir, central, central.initial_adapter, final,
                          count=config.eval.generate, max_new_tokens=config.eval.max_new_tokens,
                          samples=config.eval.samples)
    summary: dict[str, Any] = {"rounds": config.train.rounds,
                               "seconds": time.perf_counter() - recorder.started}
    if dp is not None:
        summary.update(epsilon=dp.ledger.epsilon(), delta=dp.ledger.delta,
                       stopped_at=dp.stopped_at)
    write_json_atomic(run_dir / "coordinator_summary.json", summary, indent=2, sort_keys=True)
    return summary


def make_server_app(run_config: Mapping[str, Any] | None = None, *,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp whose settings are ``run_config`` over Flower's own run config; setting
    ``stop`` ends its waits for replies (a simulation stopped in its main thread)."""
    baked = dict(run_config or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        log_to_stderr(("server", "kernels", "protocols"))  # deployed: into serverapp.log
        flat = {**dict(context.run_config), **baked}
        interval = RunConfig.from_flat(flat).federation.poll_interval_s
        run_coordinator(PollingGrid(grid, interval, stop=stop), flat)

    return app


app = make_server_app()
