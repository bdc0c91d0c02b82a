"""The SuperNode command line: one device, authenticated, talking TLS to the SuperLink.

Each SuperNode also serves a Runtime API on its own ``--port`` (its ClientApp processes
fetch messages there), so two SuperNodes on one machine need two ports. The SuperNode
retries the SuperLink forever by default (``--max-retries`` unset), which is what lets the
daemon ride out a coordinator restart or a network cut.

The SuperNode's own ``flower-superexec`` looks for new messages every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds (Flower's default 1.0 s, paid on every
message); ``task_poll_interval_s`` lowers it. ``clientapp_bin`` puts a folder first on the
SuperNode's PATH, where the warm launcher's ``flwr-clientapp`` shim lives (Flower starts
the ClientApp by bare name; see :mod:`warm_launcher`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from client.node.supernode_entry import DEFAULT_POLL_S, POLL_ENV, check_poll_interval
from protocols.processes import ManagedProcess, flower_env, flower_tool, wait_for

#: What the SuperNode logs once the SuperLink accepted it (flwr 1.41 start_client_internal).
_CONNECTED = re.compile(r"SuperNode ID: (\d+)")

NodeValue = bool | int | float | str

TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
#: A message waits half the interval on average before its ClientApp starts. Measured on the
#: 2-core box (loaded), SuperNode + SuperExec idle CPU: 0.6 % of a core at Flower's 1.0 s,
#: 1.7 % at 0.25 s, 4.1 % at 0.1 s; 0.25 s saves 0.375 s per message for ~1 % of a core.
DEFAULT_TASK_POLL_S = 0.25


@dataclass(frozen=True)
class SuperNodeSpec:
    """How to start one SuperNode. ``root_ca=None`` means plain HTTP (``--insecure``)."""

    superlink: str  # host:port of the SuperLink
    root_ca: Path | None
    private_key: Path | None  # OpenSSH EC key registered with the SuperLink
    runtime_port: int
    flwr_home: Path
    log_path: Path
    node_config: Mapping[str, NodeValue] = field(default_factory=dict)
    runtime_host: str = "127.0.0.1"
    max_retries: int | None = None  # None: reconnect forever
    max_wait_time: float | None = None
    clientapp_bin: Path | None = None  # first on PATH: the warm launcher's shim folder
    task_poll_interval_s: float = DEFAULT_TASK_POLL_S
    #: Seconds between the SuperNode's pulls while idle (Flower: a fixed 3 s), through
    #: :mod:`client.node.supernode_entry`; ``None`` runs Flower's binary unchanged.
    idle_poll_s: float | None = DEFAULT_POLL_S

    def __post_init__(self) -> None:
        if not 0 < self.runtime_port < 65536:
            raise ValueError(f"runtime_port = {self.runtime_port}: must be in 1..65535")
        if not (math.isfinite(self.task_poll_interval_s)
                and 0.01 <= self.task_poll_interval_s <= 60.0):
            raise ValueError(f"task_poll_interval_s = {self.task_poll_interval_s}: Flower "
                             "accepts 0.01..60 seconds")
        if self.private_key is not None and self.root_ca is None:
            raise ValueError("SuperNode authentication needs TLS: give the CA certificate")
        if self.idle_poll_s is not None:
            try:
                check_poll_interval(self.idle_poll_s)
            except ValueError as err:
                raise ValueError(f"idle_poll_s = {err}") from None

    def command(self) -> list[str]:
        program = ([flower_tool("flower-supernode")] if self.idle_poll_s is None else
                   [sys.executable, "-m", "client.node.supernode_entry"])
        cmd = [*program, "--superlink", self.superlink,
               "--host", self.runtime_host, "--port", str(self.runtime_port)]
        if self.root_ca is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.root_ca)]
        if self.private_key is not None:
            cmd += ["--auth-supernode-private-key", str(self.private_key)]
        if self.node_config:
            cmd += ["--node-config", node_config_arg(self.node_config)]
        if self.max_retries is not None:
            cmd += ["--max-retries", str(self.max_retries)]
        if self.max_wait_time is not None:
            cmd += ["--max-wait-time", str(self.max_wait_time)]
        return cmd

    def environment(self) -> dict[str, str]:
        """The SuperNode's environment, which its SuperExec and ClientApps inherit."""
        env = flower_env(self.flwr_home, {TASK_POLL_ENV: repr(self.task_poll_interval_s)})
        if self.idle_poll_s is not None:
            env[POLL_ENV] = repr(self.idle_poll_s)
        if self.clientapp_bin is not None:
            env["PATH"] = os.pathsep.join([str(self.clientapp_bin.absolute()), env["PATH"]])
        return env


def node_config_arg(values: Mapping[str, NodeValue]) -> str:
    """Flower's ``--node-config`` string: space-separated ``key=value`` with TOML values.

    Flower splits on whitespace outside quotes and cannot escape a quote inside a value,
    so such values are refused here rather than silently mangled.
    """
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"node config key {key!r}: use letters, digits, '-' or '_'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if '"' in value or "\\" in value or "\n" in value:
                raise ValueError(f"node config {key} = {value!r}: Flower's --node-config "
                                 "cannot carry quotes, backslashes or newlines")
            text = json.dumps(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def start_supernode(spec: SuperNodeSpec, name: str, *, wait_connected: float = 0.0
                    ) -> ManagedProcess:
    """Start a SuperNode; with ``wait_connected`` > 0, wait until the SuperLink accepted it."""
    spec.flwr_home.mkdir(parents=True, exist_ok=True)
    offset = spec.log_path.stat().st_size if spec.log_path.exists() else 0
    proc = ManagedProcess(name, spec.command(), env=spec.environment(),
                          log_path=spec.log_path, die_with_parent=True)
    if wait_connected > 0:
        try:
            wait_for(lambda: connected_node_id(spec.log_path, offset) is not None,
                     timeout=wait_connected, what=f"{name} to be accepted by the SuperLink",
                     process=proc)
        except BaseException:
            proc.stop()
            raise
    return proc


def connected_node_id(log_path: Path, offset: int = 0) -> int | None:
    """The node ID the SuperLink gave this SuperNode, read from its log after ``offset``."""
    try:
        with log_path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    found = _CONNECTED.findall(text)
    return int(found[-1]) if found else None
