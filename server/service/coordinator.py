"""``fedtune-coordinator`` (or ``fedtune coordinator``): fedtune on Flower's Deployment
Engine.

Starts a SuperLink (TLS on, SuperNode authentication on, state in SQLite) or attaches to a
running one, registers the SuperNodes' public keys, waits for enough of them to be online,
submits the run with ``flwr run`` (a config-only FAB, see ``fab``) and waits for it. The
ServerApp runs on this host (SuperLink subprocess isolation) and writes the same run folder
as a simulation: ``metrics.jsonl``, per-round checkpoints, the final PEFT adapter, report.

``--serve`` starts the SuperLink and keeps it up until SIGTERM instead (a long-lived
service, see docs/deploy.md); ``--attach HOST:PORT`` then submits runs to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.cache_dir import add_cache_dir_argument
from protocols.config_file import add_config_arguments
from protocols.processes import ManagedProcess, wait_for
from server.progress import round_progress
from server.service.certs import DEFAULT_HOSTS, make_tls, tls_files
from server.service.fab import write_app
from server.service.flwr_cli import FlwrCli, FlwrCliError
from server.service.inputs import (
    CoordinatorInputs,
    check_coordinator_inputs,
    coordinator_run_config,
)
from server.service.superlink import SuperLinkSpec, start_superlink

log = logging.getLogger(__name__)

DEFAULT_PORT = 9093
DEFAULT_STATE_DIR = Path(".fedtune-deploy/coordinator")


@dataclass(frozen=True)
class LinkOptions:
    """Where the SuperLink is and how it is secured."""

    state_dir: Path = DEFAULT_STATE_DIR
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    certs_dir: Path | None = None  # default: <state_dir>/certs
    insecure: bool = False
    node_auth: bool = True
    attach: str | None = None  # host:port of a running SuperLink
    root_ca: Path | None = None  # its CA (attach mode; default: our certs' CA)
    node_keys: tuple[Path, ...] = ()  # public keys to register (besides <certs>/nodes/*.pub)

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @property
    def tls_dir(self) -> Path:
        return self.certs_dir or self.state_dir / "certs"


@dataclass
class Timings:
    """Seconds per phase, saved as ``deployment.json`` in the run folder."""

    phases: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self._t, 2)
        self._t = now


def open_superlink(options: LinkOptions) -> tuple[ManagedProcess | None, str, Path | None]:
    """Start our SuperLink (or find the one to attach to); return (process, address, CA)."""
    if options.attach:
        ca = options.root_ca or (None if options.insecure else tls_files(options.tls_dir).ca_cert)
        if ca is not None and not ca.is_file():
            raise FileNotFoundError(f"CA certificate {ca} not found: pass --root-ca")
        return None, options.attach, ca
    tls = None if options.insecure else make_tls(
        options.tls_dir, hosts=tuple(dict.fromkeys((options.host, *DEFAULT_HOSTS))))
    spec = SuperLinkSpec(
        host=options.host, port=options.port, tls=tls,
        database=options.state_dir / "superlink-state.db", flwr_home=options.flwr_home,
        log_path=options.state_dir / "logs" / "superlink.log",
        node_auth=options.node_auth and not options.insecure,
    )
    proc = start_superlink(spec)
    return proc, spec.address, None if tls is None else tls.ca_cert


def register_keys(cli: FlwrCli, options: LinkOptions) -> list[int]:
    """Register the SuperNode public keys; a key already registered is fine.

    The keys are every ``--node-key`` plus, when we started the SuperLink, every
    ``nodes/*.pub`` in our certificates folder (what ``fedtune certs --nodes N`` made).
    Each registration is one ``flwr`` CLI start (seconds on a busy host): run in parallel.
    """
    keys = list(options.node_keys)
    nodes_dir = options.tls_dir / "nodes"
    if options.attach is None and nodes_dir.is_dir():
        keys += sorted(nodes_dir.glob("*.pub"))

    def one(key: Path) -> int | None:
        try:
            node_id = cli.register_node(key, name=key.stem)
        except FlwrCliError as err:
            if "already in use" not in str(err).lower():  # Flower's PUBLIC_KEY_ALREADY_IN_USE
                raise
            log.info("SuperNode key %s was already registered", key)
            return None
        log.info("registered SuperNode key %s as node %d", key, node_id)
        return node_id

    with ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(one, dict.fromkeys(keys)))
    return [i for i in ids if i is not None]


def online_nodes(cli: FlwrCli) -> int:
    return sum(1 for node in cli.nodes() if node.get("status") == "online")


def wait_for_run(cli: FlwrCli, run_id: int, *, timeout: float, log_path: Path,
                 poll: float = 10.0) -> str:
    """Follow the run's log into ``log_path`` until the SuperLink ends the stream (the run
    finished); return the final status (``finished:completed|failed|stopped``)."""
    deadline = time.monotonic() + timeout
    stream = cli.stream_logs(run_id, log_path)
    status = "running"
    try:
        while time.monotonic() < deadline:
            if stream.alive():
                time.sleep(1.0)
                continue
            try:
                status = cli.run_status(run_id)
            except FlwrCliError as err:  # a busy SuperLink may miss one poll
                log.warning("could not read run %d status: %s", run_id, err)
            if status.startswith("finished"):
                return status
            time.sleep(poll)  # the stream broke off early: poll instead
    finally:
        stream.stop()
    cli.stop_run(run_id)
    raise TimeoutError(f"run {run_id} still '{status}' after {timeout:.0f} s; stopped it")


def run_deployed(
    inputs: CoordinatorInputs,
    runs_dir: Path,
    options: LinkOptions,
    *,
    name: str | None = None,
    min_nodes: int | None = None,
    nodes_timeout: float = 300.0,
    run_timeout: float = 24 * 3600.0,
    on_start: Callable[[Path], None] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Run fedtune on the Deployment Engine; return the finished run folder.

    ``inputs`` are checked :class:`~server.service.inputs.CoordinatorInputs` (no device
    data: devices name their own); ``min_nodes`` (default: the
    run's clients per round) SuperNodes must be online before the run is submitted.
    ``resume=True`` continues the interrupted run ``name`` in its own folder: a new Flower
    run whose ServerApp starts from the folder's checkpoint and privacy ledger (see
    :mod:`server.checkpoint`), after stopping the Flower run the killed coordinator left.
    """
    from importlib.metadata import version

    from server.run_dir import log_to_file, new_run_dir, reopened_run_dir

    config = inputs.config
    need = min_nodes if min_nodes is not None else config.train.clients_per_round
    if resume and name is None:
        raise ValueError("resume needs the name of the interrupted run")
    name = name or time.strftime("%Y%m%d-%H%M%S-deployed")
    timings = Timings()
    opened = (reopened_run_dir(runs_dir, name) if resume
              else new_run_dir(runs_dir, "federated", config, name))
    with opened as run_dir, log_to_file(run_dir / "run.log"):
        earlier = _load_attempts(run_dir)
        if on_start:
            on_start(run_dir)
        if inputs.manifest_public_key:
            log.info("base model signed with coordinator key %s: devices pin it as "
                     "privacy.manifest_public_key", inputs.manifest_public_key)
        link, address, ca = open_superlink(options)
        try:
            timings.mark("superlink_start_s")
            cli = FlwrCli(options.flwr_home)
            cli.write_connection(address, ca)
            if options.node_auth and not options.insecure:
                register_keys(cli, options)
            timings.mark("register_s")
            wait_for(lambda: online_nodes(cli) >= need, timeout=nodes_timeout, interval=5.0,
                     what=f"{need} SuperNodes to be online at {address}", process=link)
            timings.mark("nodes_online_s")
            _stop_stale_runs(cli, earlier)
            app_dir = options.state_dir / "apps" / run_dir.name.removesuffix(".partial")
            write_app(app_dir, coordinator_run_config(inputs, run_dir),
                      version=version("fedtune"))
            run_id = cli.start_run(app_dir)
            timings.mark("submit_s")
            log.info("submitted run %d to the SuperLink at %s", run_id, address)
            _save(run_dir, run_id, address, timings, status="running", earlier=earlier)
            # The ServerApp logs into serverapp.log; the terminal gets one line per round.
            with round_progress("deployed", config.train.rounds, enabled=progress) as box:
                box.append(run_dir)
                status = wait_for_run(cli, run_id, timeout=run_timeout,
                                      log_path=run_dir / "serverapp.log")
            timings.mark("run_s")
            _save(run_dir, run_id, address, timings, status=status, earlier=earlier)
            if status != "finished:completed":
                raise RuntimeError(f"run {run_id} ended as {status}; see {run_dir}/serverapp.log")
            if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
                raise RuntimeError(f"run {run_id} completed without a final adapter in "
                                   f"{run_dir}; see {run_dir}/serverapp.log")
            _report(run_dir)
        finally:
            if link is not None:
                link.stop()
    return runs_dir / name


DEPLOYMENT_RECORD = "deployment.json"


def _load_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """Earlier coordinator attempts on this run folder (a resumed run has some)."""
    path = run_dir / DEPLOYMENT_RECORD
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    attempts: list[dict[str, Any]] = record.pop("earlier_attempts", [])
    return [*attempts, record]


def _stop_stale_runs(cli: FlwrCli, earlier: list[dict[str, Any]]) -> None:
    """A killed coordinator leaves its Flower run 'running' in the SuperLink's SQLite state;
    stop it so SuperNodes stop serving it (its late replies are never read)."""
    for attempt in earlier:
        if str(attempt.get("status", "")).startswith("finished"):
            continue
        try:
            cli.stop_run(int(attempt["run_id"]))
            log.info("stopped run %s left by an earlier coordinator", attempt["run_id"])
        except FlwrCliError as err:  # already finished, or unknown to a fresh SuperLink
            log.info("earlier run %s not stopped: %s", attempt["run_id"], err)


def _save(run_dir: Path, run_id: int, address: str, timings: Timings, *, status: str,
          earlier: list[dict[str, Any]]) -> None:
    (run_dir / DEPLOYMENT_RECORD).write_text(json.dumps(
        {"run_id": run_id, "superlink": address, "status": status,
         "phases_s": timings.phases, "earlier_attempts": earlier}, indent=2))


def _report(run_dir: Path) -> None:
    try:
        from server.report import write_report
    except ImportError as err:  # plots need the `sim` extra
        log.warning("no report (%s); install fedtune[sim] and run `fedtune report`", err)
        return
    write_report(run_dir, runs_dir=run_dir.parent)


def serve(options: LinkOptions, stop: threading.Event | None = None,
          on_ready: Callable[[str], None] | None = None) -> int:
    """Keep a SuperLink up (keys registered) until SIGTERM/SIGINT or ``stop`` is set;
    ``on_ready(address)`` is called once SuperNodes can connect."""
    stop = stop or _stop_on_signals()
    link, address, ca = open_superlink(options)
    try:
        cli = FlwrCli(options.flwr_home)
        cli.write_connection(address, ca)
        if options.node_auth and not options.insecure:
            register_keys(cli, options)
        log.info("SuperLink serving at %s; submit runs with `fedtune coordinator --attach "
                 "%s`", address, address)
        if on_ready:
            on_ready(address)
        while not stop.wait(1.0):
            if link is not None and not link.alive():
                log.error("the SuperLink exited; its log ends with:\n%s", link.log_tail())
                return 1
        return 0
    finally:
        if link is not None:
            link.stop()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune-coordinator",
        description="Run fedtune on Flower's Deployment Engine: start (or attach to) a "
        "SuperLink with TLS and SuperNode authentication, register the SuperNodes' public "
        "keys, wait for them, submit the run and wait for its adapter.")
    add_config_arguments(parser)
    add_cache_dir_argument(parser)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--name", default=None, help="run folder name")
    parser.add_argument("--resume", default=None, metavar="NAME",
                        help="continue the interrupted run NAME (runs/NAME.partial or "
                             ".failed) from its checkpoint, with the config saved in it; "
                             "no --config/--set/--name")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="SuperLink state, FLWR_HOME, logs, app folders")
    parser.add_argument("--certs-dir", type=Path, default=None,
                        help="TLS files from `fedtune certs` (made if missing; default: "
                             "<state-dir>/certs); every nodes/*.pub in it is registered")
    parser.add_argument("--host", default="127.0.0.1", help="address the SuperLink binds")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="the SuperLink's single HTTPS port (Fleet, Control, Runtime)")
    parser.add_argument("--node-key", dest="node_keys", action="append", type=Path,
                        default=[], metavar="PUB", help="a SuperNode public key to register")
    parser.add_argument("--min-nodes", type=int, default=None,
                        help="SuperNodes online before submitting (default: clients/round)")
    parser.add_argument("--nodes-timeout", type=float, default=300.0)
    parser.add_argument("--run-timeout", type=float, default=24 * 3600.0)
    parser.add_argument("--attach", default=None, metavar="HOST:PORT",
                        help="use a running SuperLink instead of starting one")
    parser.add_argument("--root-ca", type=Path, default=None,
                        help="CA certificate of the SuperLink given to --attach")
    parser.add_argument("--no-progress", action="store_true",
                        help="no per-round lines in the terminal (they are in the run folder's "
                             "metrics.jsonl and serverapp.log anyway)")
    parser.add_argument("--serve", action="store_true",
                        help="only start the SuperLink and keep it up until SIGTERM")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication (testing only)")
    parser.add_argument("--roster", type=Path, default=None,
                        help="the organisation's signed roster of devices (`fedtune roster "
                             "sign`): secure aggregation becomes authenticated, and devices "
                             "that pin the organisation key take part only then")
    parser.add_argument("--no-node-auth", action="store_true",
                        help="accept any SuperNode (TLS stays on)")
    return parser


def options_from_args(args: argparse.Namespace) -> LinkOptions:
    return LinkOptions(
        state_dir=args.state_dir.resolve(), host=args.host, port=args.port,
        certs_dir=args.certs_dir.resolve() if args.certs_dir else None,
        insecure=args.insecure, node_auth=not (args.no_node_auth or args.insecure),
        attach=args.attach, root_ca=args.root_ca,
        node_keys=tuple(p.resolve() for p in args.node_keys),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,  # no-op under `fedtune`, which configured it
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from_args(args)
    if args.serve:
        return serve(options)
    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from server.run_dir import unfinished_run_dir
    from server.run_summary import report_outcome

    runs_dir = args.runs_dir.resolve()
    if args.resume is not None:
        if args.config or args.overrides or args.name:
            parser.error("--resume continues a run with the config saved in its folder; "
                         "drop --config/--set/--name")
        config = load_config(unfinished_run_dir(runs_dir, args.resume) / "config.toml")
    else:
        config = load_config(args.config, args.overrides)
    roster = ""
    if args.roster is not None:  # checked first: the inputs check may convert a model
        from server.service.roster import read_roster

        roster = read_roster(args.roster)
    inputs = dataclasses.replace(
        check_coordinator_inputs(config, (args.cache_dir or default_cache_dir()).resolve()),
        secagg_roster=roster)
    run_dir = run_deployed(inputs, runs_dir, options, name=args.resume or args.name,
                           min_nodes=args.min_nodes, nodes_timeout=args.nodes_timeout,
                           run_timeout=args.run_timeout, resume=args.resume is not None,
                           progress=not args.no_progress)
    print(f"run folder: {run_dir}")
    print(f"adapter:    {run_dir / 'adapter'}")
    return report_outcome(run_dir, "fedtune-coordinator")


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``fedtune-coordinator`` console script (``fedtune coordinator`` runs :func:`main`
    the same way)."""
    from protocols.entry_point import run_command
    from protocols.manifest import ManifestError, ManifestMismatch
    from protocols.run_config import ConfigError
    from protocols.secagg.identity import RosterError
    from server.run_dir import ResumeError
    from server.service.flwr_cli import FlwrCliError

    return run_command("fedtune-coordinator", main, argv,
                       user_errors=(ConfigError, ManifestError, ManifestMismatch, FlwrCliError,
                                    ResumeError, FileNotFoundError, FileExistsError,
                                    RosterError))


if __name__ == "__main__":
    sys.exit(cli())
