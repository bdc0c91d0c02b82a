"""``fedtune-client`` (or ``fedtune client``): the device daemon. Runs a SuperNode with
fedtune's ClientApp from a TOML config, logs to a file, restarts the SuperNode if it dies,
exits cleanly on SIGTERM.

The SuperNode itself reconnects forever when the SuperLink goes away (coordinator restart,
network loss); this daemon covers the cases where the SuperNode process exits instead (for
example, refused because its key is not registered yet), with a capped exponential backoff.

By default the daemon also runs the device's warm ClientApp launcher (a fork server with
Flower and fedtune — and torch on ``gpu`` devices — already imported, see
:mod:`warm_launcher`) and restarts it if it dies; ``node.warm_clientapp = false`` starts
every ClientApp process cold, as Flower does.

Example config (relative paths are relative to the config file)::

    [superlink]
    address = "coordinator.example.org:9093"
    root_ca = "certs/ca.pem"

    [node]
    name = "node-0"
    private_key = "certs/nodes/node-0.key"
    kind = "gpu"                # or "edge": refuse runs that assign the other trainer
    runtime_port = 9094         # local port for this SuperNode's ClientApp processes
    state_dir = "state/node-0"  # FLWR_HOME and the log file
    warm_clientapp = true       # fork ClientApp processes from a preloaded server
    poll_interval_s = 1.0       # idle pulls from the SuperLink (Flower: every 3 s)
    # warm_preload = ["numpy", "flwr.supernode.cli", ...]  # default: by kind

    [data]
    path = "my-data"            # this device's own data: a file or folder (docs/data.md)
    format = "auto"             # or text / instruction / chat
    heldout_fraction = 0.2      # kept back for evaluation (unless the folder has its own split)
    partition_id = 0            # this device's index (seeds its batches)
    cache_dir = "cache"         # the base model (and the ONNX export for edge devices)

    [privacy]
    manifest_public_key = "<hex from the coordinator, checked out of band>"
    require_manifest = true
    require_secagg = true

    [resources]
    threads = 1
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

from client.node.supernode import NodeValue, SuperNodeSpec, start_supernode
from client.node.supernode_entry import DEFAULT_POLL_S, FLOWER_IDLE_SLEEP_S, MIN_POLL_S
from client.node.warm_launcher import EXIT_CONFIG, WarmLauncher, default_preload
from client.node_policy import ClientKind
from protocols.config_file import read_toml, toml_value
from protocols.config_schema import REQUIRED, ConfigError, Section, describe, is_path, setting
from protocols.processes import ManagedProcess
from protocols.run_config import check_device_name

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
_STABLE_S = 60.0  # a SuperNode that ran this long resets the backoff
_STOP_TIMEOUT_S = 30.0  # a busy SuperNode on a loaded host took > 10 s to exit gracefully


class DaemonConfigError(ConfigError):
    """The daemon's TOML config is missing a key or has a bad value; the message names it."""


@dataclass(frozen=True)
class DaemonConfig(Section):
    """``fedtune-client``'s settings: one TOML file, tables as in the module docstring.

    Built on the run config's machinery (:mod:`protocols.config_schema`): each field's type,
    bounds and help are checked the same way; ``table`` in its metadata says which TOML
    table holds it. Relative paths are relative to the config file.
    """

    ERROR = DaemonConfigError
    address: str = setting(REQUIRED, "the coordinator's SuperLink, host:port",
                           table="superlink")
    state_dir: Path = setting(REQUIRED, "this device's Flower home, logs and warm launcher",
                              table="node")
    runtime_port: int = setting(9094, "local port for this SuperNode's ClientApp processes",
                                ge=1, le=65535, table="node")
    name: str = setting("node", "this device's name in logs", table="node")
    root_ca: Path | None = setting(None, "CA certificate of the SuperLink's TLS certificate",
                                   table="superlink")
    insecure: bool = setting(False, "no TLS (development only; excludes root_ca)",
                             table="superlink")
    private_key: Path | None = setting(None, "this device's registered key (needs TLS)",
                                       table="node")
    kind: ClientKind = setting(
        "gpu", "'gpu' (torch) or 'edge' (ONNX Runtime): refuse runs that assign the other",
        table="node")
    log_file: Path | None = setting(
        None, "the SuperNode's log (default: state_dir/client.log)", table="node")
    path: Path | None = setting(
        None, "this device's own data: a file or folder of .txt/.md/.jsonl/.json/.csv/.parquet "
        "or a datasets save_to_disk folder; it never leaves the device", table="data")
    # The choices mirror kernels.data.formats.DATA_FORMATS.
    format: Literal["auto", "text", "instruction", "chat"] = setting(
        "auto", "the data's layout: detected from its columns, or forced", table="data")
    heldout_fraction: float = setting(
        0.2, "share of the examples kept back for evaluation (unless the data brings its own "
        "train/heldout split)", gt=0, lt=1, table="data")
    seed: int = setting(0, "fixes which examples are held out", table="data")
    partition_id: int = setting(0, "this device's index in the federation: seeds its batches",
                                table="data", ge=0)
    cache_dir: Path | None = setting(None, "the device's cache: the base model",
                                     table="data")
    edge_export: Path | None = setting(None, "the ONNX export an edge device runs",
                                       table="data")
    manifest_public_key: str = setting(
        "", "hex of the coordinator key this device trusts for the base model, checked out "
        "of band", table="privacy")
    roster_public_key: str = setting(
        "", "hex of the organisation key that signs the roster of devices (`fedtune roster "
        "org-key`); set: this device takes part only in authenticated secure aggregation",
        table="privacy")
    identity_key: Path | None = setting(
        None, "this device's identity key (`fedtune roster identity`), which signs its "
        "secure-aggregation keys; needs privacy.roster_public_key", table="node")
    require_manifest: bool = setting(True, "refuse runs that do not verify the base model",
                                     table="privacy")
    require_secagg: bool = setting(False, "refuse runs without secure aggregation",
                                   table="privacy")
    threads: int = setting(1, "torch / ONNX Runtime threads", table="resources", ge=1)
    device: str = setting(
        "", "where a gpu-kind device trains: auto (CUDA when present), cpu, cuda or cuda:N; "
        "empty: the run's client.device", table="resources")
    lora_rank: int = setting(
        0, "the LoRA rank this device trains (<= the run's lora.r; lower for a smaller "
        "device); 0: the run's", table="resources", ge=0)
    warm_clientapp: bool = setting(True, "fork ClientApp processes from a preloaded server",
                                   table="node")
    poll_interval_s: float = setting(
        DEFAULT_POLL_S, "the SuperNode's idle pulls from the SuperLink (Flower: every 3 s)",
        ge=MIN_POLL_S, le=FLOWER_IDLE_SLEEP_S, table="node")
    warm_preload: tuple[str, ...] = setting(
        (), "modules the warm launcher imports before forking; empty: chosen by kind",
        table="node")

    def check(self) -> None:
        if ":" not in self.address:
            raise DaemonConfigError(f"superlink.address = {self.address!r}: expected host:port")
        if self.insecure == (self.root_ca is not None):
            raise DaemonConfigError("set exactly one of superlink.root_ca (TLS) and "
                                    "superlink.insecure = true")
        if self.insecure and self.private_key is not None:
            raise DaemonConfigError("node.private_key needs TLS: set superlink.root_ca")
        for name in ("manifest_public_key", "roster_public_key"):
            value = getattr(self, name)
            try:
                if value and len(bytes.fromhex(value)) != 32:
                    raise ValueError
            except ValueError:
                raise DaemonConfigError(f"privacy.{name}: expected 64 hex digits (a raw "
                                        "Ed25519 public key)") from None
        if bool(self.roster_public_key) != (self.identity_key is not None):
            raise DaemonConfigError(
                "authenticated secure aggregation needs both privacy.roster_public_key (the "
                "organisation's key) and node.identity_key (this device's key); set both or "
                "neither")
        for path in (self.root_ca, self.private_key, self.identity_key):
            if path is not None and not path.is_file():
                raise DaemonConfigError(f"{path} does not exist")
        if self.device:
            check_device_name("resources.device", self.device)
        if self.path is None:
            raise DaemonConfigError("data.path is not set: name this device's own data (a "
                                    "file or folder; see docs/data.md)")
        if not self.path.exists():
            raise DaemonConfigError(f"data.path = {str(self.path)!r} does not exist")
        if self.warm_clientapp:
            try:
                self.warm_launcher()
            except ValueError as err:
                raise DaemonConfigError(f"node.warm_clientapp: {err} (or set "
                                        "node.warm_clientapp = false)") from None

    @property
    def warm(self) -> bool:
        """Whether the warm launcher runs: asked for, and on Linux (it needs ``/proc``,
        ``SO_PEERCRED`` and ``PR_SET_PDEATHSIG``)."""
        return self.warm_clientapp and sys.platform == "linux"

    def warm_launcher(self) -> WarmLauncher:
        """The device's fork server: preloads by ``kind`` unless ``warm_preload`` is set."""
        preload = self.warm_preload or default_preload(self.kind)
        return WarmLauncher(self.state_dir / "warm", preload=preload)

    @property
    def log_path(self) -> Path:
        return self.log_file or self.state_dir / "client.log"

    def node_config(self) -> dict[str, NodeValue]:
        """What the SuperNode hands the ClientApp (read by :mod:`client.node_policy`)."""
        values: dict[str, NodeValue] = {
            "partition-id": self.partition_id,
            "fedtune-client-kind": self.kind,
            "fedtune-client-threads": self.threads,
            "fedtune-require-manifest": self.require_manifest,
            "fedtune-require-secagg": self.require_secagg,
            "fedtune-data-format": self.format,
            "fedtune-data-heldout-fraction": self.heldout_fraction,
            "fedtune-data-seed": self.seed,
        }
        optional = {"fedtune-data-path": self.path,
                    "fedtune-cache-dir": self.cache_dir,
                    "fedtune-edge-export": self.edge_export,
                    "fedtune-manifest-public-key": self.manifest_public_key or None,
                    "fedtune-roster-public-key": self.roster_public_key or None,
                    "fedtune-identity-key": self.identity_key,
                    "fedtune-client-device": self.device or None}
        values.update({k: str(v) for k, v in optional.items() if v is not None})
        if self.lora_rank:  # an integer, as the run config's lora.device_rank needs it
            values["fedtune-lora-rank"] = self.lora_rank
        return values

    def supernode_spec(self) -> SuperNodeSpec:
        return SuperNodeSpec(
            superlink=self.address, root_ca=self.root_ca, private_key=self.private_key,
            runtime_port=self.runtime_port, flwr_home=self.state_dir / "flwr",
            log_path=self.log_path, node_config=self.node_config(),
            clientapp_bin=self.warm_launcher().bin_dir if self.warm else None,
            idle_poll_s=self.poll_interval_s,
        )


def _tables() -> dict[str, list[str]]:
    """TOML table -> the DaemonConfig fields it holds."""
    layout: dict[str, list[str]] = {}
    for f in fields(DaemonConfig):
        layout.setdefault(f.metadata["table"], []).append(f.name)
    return layout


def parse_config(raw: Mapping[str, Any], base_dir: Path) -> DaemonConfig:
    """Build the config from parsed TOML; unknown tables or keys are refused by name, and
    relative paths are taken from ``base_dir`` (the config file's folder)."""
    layout = _tables()
    hints = get_type_hints(DaemonConfig)
    kwargs: dict[str, Any] = {}
    for table, values in raw.items():
        if table not in layout:
            raise DaemonConfigError(f"unknown table [{table}]; valid: {sorted(layout)}")
        if not isinstance(values, Mapping):
            raise DaemonConfigError(f"[{table}] must be a table")
        for key, value in values.items():
            if key not in layout[table]:
                raise DaemonConfigError(f"unknown key {table}.{key}; valid keys in [{table}]: "
                                        f"{sorted(layout[table])}")
            if is_path(hints[key]) and isinstance(value, str) and value:
                value = (base_dir / value).resolve()
            kwargs[key] = value
    for f in fields(DaemonConfig):
        if f.default is REQUIRED and f.name not in kwargs:
            raise DaemonConfigError(f"{f.metadata['table']}.{f.name} is required")
    return DaemonConfig(**kwargs)


def describe_config() -> str:
    """Every key of the daemon's TOML with its type, default and help (``--help``)."""
    rows = []
    for key, kind, default, help_text in describe(DaemonConfig):
        shown = default if default == "(required)" else f"default {toml_value(default)}"
        rows.append(f"  {key} ({kind}, {shown})\n      {help_text}")
    return "\n".join(rows)


def load_config(path: Path) -> DaemonConfig:
    raw = read_toml(path, what="daemon config", error=DaemonConfigError)
    return parse_config(raw, path.parent.resolve())


#: run_daemon's exit status when the SuperNode's port is taken (restarting would loop).
EXIT_PORT_TAKEN = 3


def _port_in_use(port: int, host: str = "127.0.0.1") -> str | None:
    """Why ``port`` cannot be bound on ``host`` (the SuperNode's runtime address), or None."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only a live listener
        try:
            probe.bind((host, port))
        except OSError as err:
            return err.strerror or str(err)
    return None


class _ForkServerKeeper:
    """Keeps the warm launcher's fork server up beside the SuperNode: restarts it with a
    capped backoff when it dies, gives up when its preload list cannot work. While it is
    down the shim starts ClientApps cold, so nothing waits on it."""

    def __init__(self, launcher: WarmLauncher, env: dict[str, str], name: str) -> None:
        self.launcher, self.env, self.name = launcher, env, f"{name} fork server"
        self.proc: ManagedProcess | None = None
        self.started = 0.0
        self.next_start = 0.0
        self.backoff = 1.0
        self.gave_up = False

    def check(self) -> None:
        """Start the server if it is due; call every second or so."""
        now = time.monotonic()
        if self.proc is not None and not self.proc.alive():
            code = self.proc.popen.returncode
            self.proc.stop()
            self.proc = None
            if code == EXIT_CONFIG:
                self.gave_up = True
                log.error("%s cannot preload %s; ClientApps start cold (see %s)", self.name,
                          list(self.launcher.preload), self.launcher.log_path)
                return
            if now - self.started > _STABLE_S:
                self.backoff = 1.0
            log.warning("%s exited with status %s (see %s); restarting in %.0f s", self.name,
                        code, self.launcher.log_path, self.backoff)
            self.next_start = now + self.backoff
            self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)
        if self.proc is None and not self.gave_up and now >= self.next_start:
            self.started = now
            self.proc = self.launcher.start(self.env, self.name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=_STOP_TIMEOUT_S)
            self.proc = None


def run_daemon(config: DaemonConfig, stop: threading.Event) -> int:
    """Keep one SuperNode (and its warm launcher) running until ``stop`` is set; return the
    exit status (0)."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if (taken := _port_in_use(config.runtime_port)) is not None:
        log.error("node.runtime_port %d is already in use (%s): is another SuperNode of this "
                  "device still running (an earlier daemon's)? Stop it, or give this device "
                  "another node.runtime_port", config.runtime_port, taken)
        return EXIT_PORT_TAKEN
    spec = config.supernode_spec()
    warm = (_ForkServerKeeper(config.warm_launcher(), spec.environment(), config.name)
            if config.warm else None)
    backoff = 1.0
    try:
        while not stop.is_set():
            if warm is not None:
                warm.check()  # first: it preloads while the SuperNode connects
            started = time.monotonic()
            proc: ManagedProcess = start_supernode(spec, config.name)
            try:
                while proc.alive() and not stop.wait(1.0):
                    if warm is not None:
                        warm.check()
            finally:
                code = proc.popen.poll()
                proc.stop(timeout=_STOP_TIMEOUT_S)
            if stop.is_set():
                log.info("stopped SuperNode %s", config.name)
                return 0
            if time.monotonic() - started > _STABLE_S:
                backoff = 1.0
            log.warning("SuperNode %s exited with status %s (see %s); restarting in %.0f s",
                        config.name, code, config.log_path, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        return 0
    finally:
        if warm is not None:
            warm.stop()  # after the SuperNode: its shims relay their children's ends


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune-client",
        description="Run this device as a fedtune SuperNode (daemon): connects to the "
        "coordinator's SuperLink over TLS with its registered key, trains with fedtune's "
        "ClientApp, reconnects after outages, exits cleanly on SIGTERM.",
        epilog="config keys (TOML tables and keys; relative paths are relative to the "
        "file):\n" + describe_config(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="the daemon's TOML config")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,  # no-op under `fedtune`, which configured it
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(config.state_dir / "daemon.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("fedtune client %s: SuperLink %s, SuperNode log %s", config.name, config.address,
             config.log_path)
    try:
        return run_daemon(config, stop)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``fedtune-client`` console script (``fedtune client`` runs :func:`main` the same
    way)."""
    from protocols.entry_point import run_command
    from protocols.manifest import ManifestError
    from protocols.run_config import ConfigError

    return run_command("fedtune-client", main, argv,
                       user_errors=(DaemonConfigError, ConfigError, ManifestError,
                                    FileNotFoundError))


if __name__ == "__main__":
    sys.exit(cli())
