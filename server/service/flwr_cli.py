"""The ``flwr`` CLI calls the coordinator needs, against one named SuperLink connection.

``flwr`` reads its connections from ``$FLWR_HOME/config.toml``; for TLS a connection names
the CA file (``root-certificates``). We write our own connection there and call the CLI
with ``--format json`` rather than importing Flower's CLI internals, whose module layout
changes between releases while the command line is documented.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.processes import ManagedProcess, flower_env, flower_tool

CONNECTION = "fedtune"


class FlwrCliError(RuntimeError):
    """A ``flwr`` command failed; the message holds the command and its output."""


@dataclass(frozen=True)
class FlwrCli:
    """The ``flwr`` CLI bound to ``flwr_home`` and one connection in its config."""

    flwr_home: Path
    connection: str = CONNECTION
    timeout: float = 120.0

    def write_connection(self, address: str, root_ca: Path | None) -> Path:
        """Make ``connection`` the default in ``$FLWR_HOME/config.toml`` (rewritten whole:
        this FLWR_HOME belongs to the coordinator)."""
        lines = ["[superlink]", f'default = "{self.connection}"', "",
                 f"[superlink.{self.connection}]", f"address = {json.dumps(address)}"]
        if root_ca is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(root_ca.resolve()))}")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def call(self, *args: str, timeout: float | None = None) -> dict[str, Any]:
        """Run ``flwr ARGS --format json``; return the JSON it printed."""
        cmd = [flower_tool("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(
                cmd, env=flower_env(self.flwr_home), capture_output=True, text=True,
                timeout=timeout or self.timeout, check=False, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise FlwrCliError(f"`{' '.join(cmd)}` timed out after {exc.timeout} s") from None
        payload = _last_json(done.stdout)
        if done.returncode != 0 or payload is None or not payload.get("success", False):
            raise FlwrCliError(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n"
                f"{done.stdout.strip()}\n{done.stderr.strip()}".strip()
            )
        return payload

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        """Register a SuperNode's public key; return the node ID the SuperLink assigned."""
        args = ["supernode", "register", str(public_key), self.connection]
        if name:
            args += ["--name", name]
        return int(self.call(*args)["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's view of its SuperNodes (``status``: registered/online/...)."""
        return list(self.call("supernode", "list", self.connection).get("nodes", []))

    def start_run(self, app_dir: Path) -> int:
        """Submit the Flower App folder as a run; return its run ID."""
        return int(self.call("run", str(app_dir), self.connection)["run-id"])

    def run_status(self, run_id: int) -> str:
        """``pending``, ``starting``, ``running`` or ``finished:<completed|failed|stopped>``."""
        runs = self.call("list", self.connection, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise FlwrCliError(f"the SuperLink knows no run {run_id}")
        return str(runs[0]["status"])

    def stop_run(self, run_id: int) -> None:
        self.call("stop", str(run_id), self.connection)

    def stream_logs(self, run_id: int, log_path: Path) -> ManagedProcess:
        """Start ``flwr log RUN_ID --stream`` writing the ServerApp's log to ``log_path``.

        The SuperLink ends the stream when the run finishes, so the process exiting is the
        cheap signal to read the final status (one CLI start, instead of polling).
        """
        cmd = [flower_tool("flwr"), "log", str(run_id), self.connection, "--stream"]
        return ManagedProcess(f"flwr log {run_id}", cmd, env=flower_env(self.flwr_home),
                              log_path=log_path)


def _last_json(stdout: str) -> dict[str, Any] | None:
    """The last line of ``stdout`` that parses as a JSON object (banners come first)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    try:
        whole = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    return whole if isinstance(whole, dict) else None
