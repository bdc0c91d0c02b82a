"""The SuperLink command line (TLS and SuperNode authentication on unless asked otherwise).

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr`` CLI) and the
Runtime API (the ServerApp's SuperExec) on a single HTTPS port (``--host``/``--port``).
With ``--enable-supernode-auth`` a SuperNode may only connect with a key registered
beforehand through the Control API (``flwr supernode register``); ``--database`` keeps
runs and registered nodes in SQLite, so they survive a SuperLink restart.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from protocols.processes import ManagedProcess, flower_env, flower_tool, wait_for
from server.service.certs import TlsFiles


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to start one SuperLink. ``tls=None`` means plain HTTP (``--insecure``), which
    Flower refuses together with node authentication."""

    host: str
    port: int
    tls: TlsFiles | None
    database: Path
    flwr_home: Path
    log_path: Path
    node_auth: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port = {self.port}: must be in 1..65535")
        if self.node_auth and self.tls is None:
            raise ValueError("SuperNode authentication needs TLS: give TLS files or turn "
                             "node authentication off")

    @property
    def address(self) -> str:
        """``host:port`` as SuperNodes and the ``flwr`` CLI dial it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [flower_tool("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--database", str(self.database), "--disable-runtime-dependency-installation"]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--ssl-ca-certfile", str(self.tls.ca_cert),
                    "--ssl-certfile", str(self.tls.server_cert),
                    "--ssl-keyfile", str(self.tls.server_key)]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        return cmd


def start_superlink(spec: SuperLinkSpec, *, timeout: float = 60.0) -> ManagedProcess:
    """Start the SuperLink and wait until its ``/health`` answers over TLS."""
    spec.database.parent.mkdir(parents=True, exist_ok=True)
    spec.flwr_home.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess("superlink", spec.command(), env=flower_env(spec.flwr_home),
                          log_path=spec.log_path)
    try:
        wait_for(lambda: healthy(spec), timeout=timeout, what="the SuperLink to answer",
                 process=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def healthy(spec: SuperLinkSpec) -> bool:
    """Whether ``GET /health`` succeeds, verifying the certificate against our CA."""
    scheme = "http" if spec.tls is None else "https"
    context = None if spec.tls is None else ssl.create_default_context(
        cafile=str(spec.tls.ca_cert))
    try:
        with urllib.request.urlopen(f"{scheme}://{spec.address}/health", timeout=2,
                                    context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
