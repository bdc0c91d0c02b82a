"""``flwr run .``: fedtune as a Flower App on Flower's own Simulation Engine.

The repository's ``pyproject.toml`` names this module's apps in ``[tool.flwr.app]``, so
``flwr run .`` from the repository root runs the main job (the same config as ``fedtune
simulate``; ``-c 'train.rounds=3'`` and friends override keys) under Flower's launcher: a
local SuperLink in simulation mode, one ``flwr-simulation`` process, Ray workers.

Flower starts these apps with nothing prepared, so the ServerApp does what ``fedtune
simulate`` does before it starts Flower: it checks the inputs, converts and signs the base
model in the cache, and writes each simulated device's folder (the simulating host plays
every party; a real coordinator never does this — :mod:`server.service.coordinator` needs
no device data). It then runs the very coordinator of :mod:`server.app` in a run folder
``runs/flwr-<run id>``. The simulated devices are :mod:`client.app`'s ClientApp; the one
thing Flower cannot tell them — where the run's files are, which only exist once the
ServerApp has prepared them — reaches them through a small file in the cache, keyed by
Flower's run id (:func:`publish_paths`), read by the ClientApp with every message.

On a deployment, use ``fedtune-coordinator``: its app bundle names ``server.app:app`` and
``client.app:app`` and carries no simulation code. This ServerApp refuses to run anywhere
but on the Simulation Engine.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.app import make_client_app
from protocols.atomic_write import write_json_atomic
from protocols.cache_dir import default_cache_dir
from protocols.run_config import ConfigError, PathsSection, RunConfig

log = logging.getLogger(__name__)

#: Where the run folders go, relative to the simulation's working directory (as for
#: ``fedtune simulate``'s default ``--runs-dir``).
RUNS_DIR = Path("runs")
#: Only these keys of the prepared run config travel to the simulated devices.
_DEVICE_PATHS = ("cache_dir", "devices_dir", "manifest_public_key", "edge_export",
                 "signed_manifest", "roster_public_key")


def run_cache_dir(flat: dict[str, Any]) -> Path:
    """``paths.cache_dir`` of the run config if set, else fedtune's default cache
    (``$FEDTUNE_CACHE`` or ``./.fedtune-cache`` of the simulation's working directory)."""
    return PathsSection.from_flat(flat).cache_dir or default_cache_dir()


def paths_file(cache_dir: Path, run_id: int) -> Path:
    return cache_dir / "flwr-runs" / f"{run_id}.json"


def publish_paths(cache_dir: Path, run_id: int, flat: dict[str, Any]) -> Path:
    """Write what the simulated devices of run ``run_id`` need to find their files."""
    paths = {f"paths.{k}": flat[f"paths.{k}"] for k in _DEVICE_PATHS if f"paths.{k}" in flat}
    target = paths_file(cache_dir, run_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, paths, indent=2)
    return target


def _check_simulation(grid: Grid) -> None:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        raise RuntimeError(
            "this Flower App (simulations.flower_app) simulates every device on this host; "
            "to coordinate real devices run `fedtune-coordinator`, whose app bundle carries "
            "no simulation code")


def check_nodes(nodes: int, num_devices: int, per_round: int) -> None:
    """The federation's SuperNodes against the simulated devices: node ``i`` plays device
    ``i`` (its partition id), so there may be fewer nodes than devices, never more."""
    if nodes > num_devices:
        raise ConfigError(
            f"the federation has {nodes} SuperNodes but the data makes {num_devices} devices; "
            f"run with --federation-config 'num-supernodes={num_devices}' (or fewer)")
    if nodes < per_round:
        raise ConfigError(
            f"the federation has {nodes} SuperNodes, fewer than train.clients_per_round = "
            f"{per_round}; run with --federation-config 'num-supernodes={num_devices}' or "
            f"lower train.clients_per_round (-c 'train.clients_per_round={nodes}')")
    if nodes < num_devices:
        log.info("%d SuperNodes play devices 0..%d of the %d the data makes; "
                 "--federation-config 'num-supernodes=%d' simulates all of them",
                 nodes, nodes - 1, num_devices, num_devices)


def settled_node_count(grid: Grid, at_least: int, *, timeout_s: float = 120.0,
                       stable_s: float = 1.0) -> int:
    """The federation's SuperNode count once it stops changing. Flower's launcher starts the
    ServerApp before the Simulation Engine has registered every SuperNode, so one early
    look can see none or some of them."""
    deadline = time.monotonic() + timeout_s
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count >= at_least and time.monotonic() - since >= stable_s:
            return count
        time.sleep(0.2)
    return max(count, 0)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from server.app import run_coordinator
    from server.polling_grid import PollingGrid
    from server.progress import round_progress
    from server.run_summary import record_outcome
    from simulations.runner import check_inputs, run_federated

    _check_simulation(grid)
    _log_to_stderr()
    flat = dict(context.run_config)
    config = RunConfig.from_flat(flat)
    cache_dir = run_cache_dir(flat)
    log.info("fedtune under `flwr run`: cache %s, run folders in %s", cache_dir,
             RUNS_DIR.resolve())
    inputs = check_inputs(config, cache_dir)
    check_nodes(settled_node_count(grid, config.train.clients_per_round), inputs.num_clients,
                config.train.clients_per_round)
    published: list[Path] = []

    def engine(prepared: dict[str, Any]) -> None:
        published.append(publish_paths(cache_dir, context.run_id, prepared))
        run_coordinator(PollingGrid(grid, config.federation.poll_interval_s), prepared)

    try:
        with round_progress("flwr run", config.train.rounds) as box:
            run_dir = run_federated(inputs, RUNS_DIR.resolve(),
                                    name=f"flwr-{context.run_id}", engine=engine,
                                    on_start=box.append)
    finally:
        for path in published:
            path.unlink(missing_ok=True)
    summary = record_outcome(run_dir)
    log.info("run folder %s (report.html, adapter/); %s", run_dir, summary.line())
    if summary.degraded:
        raise RuntimeError(f"degraded run: {summary.line()}")


#: fedtune's own loggers (the packages of this repository).
_PACKAGES = ("protocols", "kernels", "client", "server", "simulations")


def _log_to_stderr() -> None:
    """fedtune's INFO lines on the streamed log (Flower configures only its own logger;
    the root logger stays as Flower left it, so other libraries stay quiet)."""
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        if not any(getattr(h, "_fedtune", False) for h in logger.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setLevel(logging.INFO)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            handler._fedtune = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    # Flower's launcher leaves the root logger open to DEBUG: its HTTP client would log
    # every log upload (one line a second) into the run log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def prepared_paths(context: Context) -> dict[str, Any]:
    """The run's paths the ServerApp prepared (:func:`publish_paths`): the ClientApp's
    device folder, cache and signed manifest."""
    target = paths_file(run_cache_dir(dict(context.run_config)), context.run_id)
    try:
        paths: dict[str, Any] = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeError(
            f"no prepared paths for run {context.run_id} at {target}: the ServerApp writes "
            "them before the first round; the ClientApps must see the same cache (start "
            "`flwr run` where the local SuperLink started, or set paths.cache_dir)") from None
    return paths


client_app = make_client_app(late_settings=prepared_paths)
