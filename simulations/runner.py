"""``fedtune simulate``: the federated run on Flower's Simulation Engine, and the
centralized baseline trained on the union of the same training speeches.

The simulation uses the very ServerApp and ClientApp of ``server.app`` / ``client.app``;
this module only checks inputs, prepares the split, and starts Flower's engine.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from protocols import keys
from protocols.run_config import ConfigError, RunConfig
from server.run_dir import log_to_file, new_run_dir, reopened_run_dir
from server.service.inputs import (
    CoordinatorInputs,
    check_coordinator_inputs,
    coordinator_run_config,
)
from simulations.devices import SimulatedDevices, prepare_devices
from simulations.flower_patches import seeded_node_ids
from simulations.organisation import simulated_organisation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs(CoordinatorInputs):
    """A simulation's inputs: the coordinator's, plus the simulated devices' folders."""

    devices: SimulatedDevices | None = None

    @property
    def num_clients(self) -> int:
        assert self.devices is not None
        return self.devices.num_clients


def check_inputs(config: RunConfig, cache_dir: Path) -> Inputs:
    """Fail early with one clear error: model, data and client count are all checked."""
    from kernels.base_model import resolve_model_dir

    resolve_model_dir(config.model.source, cache_dir)  # the cheapest check first
    devices = prepare_devices(config.data, cache_dir)
    if devices.num_clients < config.train.clients_per_round:
        raise ConfigError(
            f"train.clients_per_round = {config.train.clients_per_round} but only "
            f"{devices.num_clients} devices have >= {config.data.min_examples} examples; lower "
            "train.clients_per_round or data.min_examples"
        )
    check_gpus_for_simulation(config)
    coordinator = check_coordinator_inputs(config, cache_dir)
    return Inputs(**{f.name: getattr(coordinator, f.name) for f in fields(coordinator)},
                  devices=devices)


def check_gpus_for_simulation(config: RunConfig) -> None:
    """Refuse GPU shares on a machine without CUDA (Ray would wait for ever for a GPU to
    place the clients on), and clients pinned to CUDA without a share of a GPU (Ray hides
    the GPUs from a client that reserved none)."""
    client_gpus = config.federation.client_gpus
    if client_gpus > 1 and client_gpus != int(client_gpus):
        raise ConfigError(f"federation.client_gpus = {client_gpus}: above 1 it must be a whole "
                          "number of GPUs (Ray places fractions of one GPU only)")
    index = config.client.device.partition(":")[2]
    if index and int(index) >= max(1, int(client_gpus)):
        raise ConfigError(
            f"client.device = {config.client.device!r}: a simulated client sees only the "
            f"GPU share Ray gives it, as cuda:0{'..' if client_gpus > 1 else ''}; use "
            "'cuda' or 'auto'")
    if client_gpus == 0:
        if config.client.device.startswith("cuda"):
            raise ConfigError(
                f"client.device = {config.client.device!r} in a simulation needs "
                "federation.client_gpus > 0 (e.g. 0.25: four clients share a GPU); Ray gives "
                "a simulated client a GPU only for its reserved share")
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"federation.client_gpus = {client_gpus} but torch sees no CUDA device on this "
            "machine; set it to 0 (clients then train on the CPU)")
    if client_gpus > torch.cuda.device_count():
        raise ConfigError(
            f"federation.client_gpus = {client_gpus}: more GPUs per client than the "
            f"{torch.cuda.device_count()} this machine has")


def flower_run_config(inputs: Inputs, run_dir: Path) -> dict[str, Any]:
    """The run config a simulation starts Flower with: the devices' folders, (unless
    ``eval.path`` names one) a sample of their held-out data as the central evaluation set,
    since the simulating host plays the coordinator too, and under secure aggregation the
    simulated organisation's signed roster and key."""
    assert inputs.devices is not None
    flat = coordinator_run_config(inputs, run_dir, devices_dir=inputs.devices.root)
    if inputs.config.eval.path is None:
        flat["eval.path"] = str(inputs.devices.eval_file)
    if inputs.config.security.secagg:
        # Authenticated secure aggregation: the simulation plays the organisation too.
        org = simulated_organisation(inputs.devices.root, inputs.num_clients, inputs.cache_dir,
                                     min_nodes=inputs.config.train.clients_per_round)
        flat["paths.secagg_roster"] = org.roster_text
        flat["paths.roster_public_key"] = org.org_public_key
    return flat


def run_federated(
    inputs: Inputs,
    runs_dir: Path,
    *,
    name: str | None = None,
    on_start: Callable[[Path], None] | None = None,
    client_mods: list[Any] | None = None,
    resume: bool = False,
    engine: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Run the federated simulation; return the finished run folder.

    ``client_mods`` are Flower client mods wrapped around every ClientApp handler.
    ``resume=True`` continues the interrupted run ``name`` in its own folder: the ServerApp
    starts after its last checkpointed round, with its adapter, privacy ledger and metrics
    (:mod:`server.checkpoint`); rounds sample devices and batches from (seed, round), so the
    rest of the run is the one the interrupted run would have trained.
    ``engine`` runs the coordinator with the prepared run config instead of starting
    Flower's engine here (``flwr run``, where Flower has started it already).
    """
    config = inputs.config
    if resume and name is None:
        raise ValueError("resume needs the name of the interrupted run")
    opened = (reopened_run_dir(runs_dir, name) if resume and name is not None
              else new_run_dir(runs_dir, "federated", config, name))
    with opened as run_dir, log_to_file(run_dir / "run.log"):
        if on_start:
            on_start(run_dir)
        flat = flower_run_config(inputs, run_dir)
        if engine is not None:
            engine(flat)
        else:
            with seeded_node_ids(config.train.seed):  # same partitions sampled on every rerun
                _run_simulation(flat, inputs, client_mods)
        if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
            raise RuntimeError(
                f"the simulation ended without a final adapter in {run_dir}; "
                "see the Flower log above for the failing round"
            )
        _finish(run_dir)
    return runs_dir / run_dir.name.removesuffix(".partial")


def _run_simulation(flat: dict[str, Any], inputs: Inputs, client_mods: list[Any] | None
                    ) -> None:
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    config = inputs.config
    cpus = os.cpu_count() or 1
    parallel = parallel_clients(config, cpus, available_memory_bytes())
    stop = threading.Event()
    try:
        run_simulation(
            server_app=make_server_app(flat, stop=stop),
            client_app=make_client_app(flat, mods=client_mods),
            num_supernodes=inputs.num_clients,
            backend_config={
                # Flower passes these to Ray's actor options. A ClientApp worker that dies
                # (Ray's out-of-memory killer, a crash) is restarted instead of leaving the
                # pool for good, which had every later round fail at once; a task on it is
                # retried up to twice (a message that keeps killing its worker becomes an
                # error reply, counted as a failed client), also while it restarts.
                "client_resources": {
                    # Flower sizes its pool of workers by CPUs alone: the CPU share is what
                    # also keeps the number of clients at once within memory.
                    # (rounded down: Flower takes int(cpus / num_cpus), and 9 / (9 / 7) < 7)
                    "num_cpus": math.floor(cpus / parallel * 1e4) / 1e4,
                    # Ray packs 1 / client_gpus clients onto each GPU it detects.
                    "num_gpus": config.federation.client_gpus,
                    "max_restarts": -1,
                    "max_task_retries": 2,
                },
                "init_args": {
                    "num_cpus": cpus,
                    "include_dashboard": False,
                    "log_to_driver": True,
                },
            },
        )
    except BaseException:
        # Ctrl-C lands in this (main) thread; Flower's ServerApp thread would otherwise wait
        # out the round timeout for replies that never come, and keep the process alive.
        stop.set()
        raise


def parallel_clients(config: RunConfig, cpus: int, available_bytes: int | None) -> int:
    """How many simulated clients train at once: as many as ``federation.client_cpus``
    allows, and no more than ``federation.client_memory_gb`` each fit in 80 % of the
    available memory (Ray's out-of-memory killer otherwise takes workers mid-round)."""
    by_cpu = max(1, int(cpus / config.federation.client_cpus))
    if config.federation.client_memory_gb <= 0 or available_bytes is None:
        return by_cpu
    by_memory = max(1, int(0.8 * available_bytes // (config.federation.client_memory_gb * 2**30)))
    if by_memory < by_cpu:
        log.warning("%d clients at once (not %d): each may need %.1f GB and %.1f GB is "
                    "available (federation.client_memory_gb)", by_memory, by_cpu,
                    config.federation.client_memory_gb, available_bytes / 2**30)
    return min(by_cpu, by_memory)


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_centralized(
    inputs: Inputs,
    runs_dir: Path,
    *,
    name: str | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> Path:
    """Train the same adapter on the union of all devices' training examples.

    Same model, LoRA init, optimiser, learning rate, batch size and number of examples
    seen as the federated run (rounds x clients_per_round x local_steps batches), evaluated
    on the same held-out blocks after every round-equivalent of steps.
    """
    from client.local_data import DeviceDataSource, LocalData, load_device_data
    from client.torch_trainer import TorchLoraTrainer
    from client.trainer import TrainInstruction
    from server.central_eval import CentralModel
    from server.export import save_peft_adapter
    from server.metrics_log import append_metrics

    config = inputs.config
    threads = os.cpu_count() or 1
    with new_run_dir(runs_dir, "centralized", config, name) as run_dir, log_to_file(
        run_dir / "run.log"
    ):
        if on_start:
            on_start(run_dir)
        devices = inputs.devices
        assert devices is not None
        union = LocalData("centralized", tuple(
            example for i in range(devices.num_clients)
            for example in load_device_data(DeviceDataSource(devices.folder(i)), f"device-{i}"
                                            ).train), ())
        central = CentralModel(inputs.model_dir, config, threads=threads)
        central.load_eval_data(config.eval.path or devices.eval_file,
                               seq_len=config.train.seq_len, max_blocks=config.eval.max_blocks)
        trainer = TorchLoraTrainer(inputs.model_dir, config.lora, threads=threads,
                                   model_section=config.model, template=config.data.template)
        adapter = central.initial_adapter
        t0 = time.perf_counter()
        append_metrics(run_dir, {"round": 0, "wall_s": 0.0, **central.evaluate(adapter)})
        steps = config.train.clients_per_round * config.train.local_steps
        for rnd in range(1, config.train.rounds + 1):
            outcome = trainer.train(
                adapter,
                union,
                TrainInstruction(rnd, steps, config.train.batch_size,
                                 config.train.learning_rate, config.train.seq_len,
                                 config.train.seed),
            )
            adapter = {**adapter, **outcome.tensors}  # frozen tensors are not returned
            row = {"round": rnd, "wall_s": time.perf_counter() - t0,
                   "train_loss": outcome.metrics[keys.TRAIN_LOSS], **central.evaluate(adapter)}
            append_metrics(run_dir, row)
            log.info("centralized round-equivalent %d: perplexity %.2f", rnd, row["perplexity"])
        save_peft_adapter(run_dir / "adapter", adapter, central.peft_config)
        if config.eval.generate > 0:
            from server.generation_eval import write_generations

            write_generations(run_dir, central, central.initial_adapter, adapter,
                              count=config.eval.generate,
                              max_new_tokens=config.eval.max_new_tokens,
                              samples=config.eval.samples)
        _finish(run_dir)
    return runs_dir / run_dir.name.removesuffix(".partial")


def _finish(run_dir: Path) -> None:
    from server.report import write_report

    write_report(run_dir, runs_dir=run_dir.parent)
