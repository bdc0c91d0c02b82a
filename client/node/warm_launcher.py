"""Warm ClientApp launcher: a per-device fork server, so that the ClientApp process Flower
starts for every message does not pay for importing Flower, numpy or torch again.

Why: Flower 1.41's SuperNode hands each message to ``flower-superexec``, whose
``SubprocessExecutor`` starts a fresh ``flwr-clientapp`` process by bare name from PATH.
That process pays Python start-up + ``import flwr`` (~1.3 s idle, ~6 s loaded on the
2-core box) + fedtune's imports (torch/transformers/PEFT: ~30 s) before the handler runs,
on every message. Flower's own prestarted workers (``warm_executor*.py`` in
``flwr/supercore/superexec/executor``) exist only for the Kubernetes executor and the
AgentApp/connector task types, not for ClientApps under the subprocess executor; so we add
our own underneath Flower, invisible to it:

- A fork server (:mod:`warm_forkserver`, one per device, started by ``fedtune client``
  beside its SuperNode) imports once what every ClientApp process imports, then waits on a
  Unix socket (mode 0600, in a 0700 folder of the node's state dir).
- A shim named ``flwr-clientapp`` (:mod:`warm_shim`), in a folder put first on the
  SuperNode's PATH, passes its argv, environment, cwd and stdio descriptors; the server
  forks a child that takes them over and runs Flower's real ``flwr-clientapp`` script. Every
  message still gets a fresh process (Flower's isolation is unchanged), minus the imports.
- The shim waits for the child's status and exits with it, forwards signals, and its
  connection dropping kills the child. Without a server (or when it refuses) the shim execs
  the real program: correctness never depends on the warm path.

This module is the daemon's side: where the launcher lives, what it preloads, the shim.
Fork safety and the one Flower setting warm children change are in :mod:`warm_child`.
Linux only (``/proc``, ``SO_PEERCRED``, ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from client.node import warm_shim
from client.node.warm_forkserver import EXIT_CONFIG, TERM_GRACE_S
from protocols.atomic_write import write_text_atomic
from protocols.processes import ManagedProcess, bin_dir

__all__ = ["EDGE_PRELOAD", "EXIT_CONFIG", "TORCH_PRELOAD", "WarmLauncher", "default_preload",
           "write_shim"]

CLIENTAPP = "flwr-clientapp"
#: Unix socket paths are limited to 107 bytes (sun_path[108] with the NUL, Linux).
MAX_SOCKET_PATH = 107

#: What every ClientApp process imports before fedtune's handler runs (``flwr-clientapp``'s
#: entry point and runtime, the app module ``client.app`` and its ``client.node_policy``),
#: plus the edge trainer. Not onnxruntime: see :mod:`warm_child`.
EDGE_PRELOAD = ("numpy", "flwr.supernode.cli", "flwr.supernode.runtime.run_clientapp",
                "client.node_policy", "client.edge_trainer")
#: GPU (torch) devices also keep torch, transformers and PEFT imported (~30 s per message).
TORCH_PRELOAD = (*EDGE_PRELOAD, "torch", "transformers", "peft", "client.torch_trainer")


def default_preload(kind: str) -> tuple[str, ...]:
    """The preload list for a device kind (``gpu`` or ``edge``, as in the daemon config)."""
    if kind not in ("gpu", "edge"):
        raise ValueError(f"device kind {kind!r}: expected 'gpu' or 'edge'")
    return TORCH_PRELOAD if kind == "gpu" else EDGE_PRELOAD


@dataclass(frozen=True)
class WarmLauncher:
    """One device's warm launcher: its folder (shim, socket, log) and what it preloads."""

    home: Path  # a folder of the node's own; made 0700
    preload: tuple[str, ...] = EDGE_PRELOAD
    target: Path = field(default_factory=lambda: bin_dir() / CLIENTAPP)
    term_grace_s: float = TERM_GRACE_S

    def __post_init__(self) -> None:
        length = len(os.fsencode(self.socket_path.absolute()))
        if length > MAX_SOCKET_PATH:
            raise ValueError(f"warm launcher socket {self.socket_path.absolute()} is {length} "
                             f"bytes; Unix sockets allow {MAX_SOCKET_PATH}: use a shorter "
                             "state folder")
        for name in self.preload:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                raise ValueError(f"preload entry {name!r} is not a module name")
        if self.term_grace_s <= 0:
            raise ValueError(f"term_grace_s = {self.term_grace_s}: must be > 0")

    @property
    def bin_dir(self) -> Path:
        """Put first on the SuperNode's PATH: holds only the ``flwr-clientapp`` shim."""
        return self.home / "bin"

    @property
    def socket_path(self) -> Path:
        return self.home / "clientapp.sock"

    @property
    def log_path(self) -> Path:
        return self.home / "forkserver.log"

    def install(self) -> Path:
        """Make the private folder and write the shim; return the shim's path."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)
        return write_shim(self.bin_dir, self.socket_path, self.target)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "client.node.warm_forkserver",
                "--socket", str(self.socket_path.absolute()),
                "--target", str(self.target.absolute()),
                "--preload", ",".join(self.preload), "--term-grace", str(self.term_grace_s)]

    def ready(self) -> bool:
        """Whether the fork server listens (it binds its socket after preloading)."""
        try:
            return stat.S_ISSOCK(self.socket_path.lstat().st_mode)
        except OSError:
            return False

    def start(self, env: Mapping[str, str], name: str) -> ManagedProcess:
        """Start the fork server with the SuperNode's environment (what the ClientApp
        processes would start with). It listens once its preloading is done."""
        self.install()
        self.socket_path.unlink(missing_ok=True)  # a dead server's: shims must not wait on it
        return ManagedProcess(name, self.command(), env=env, log_path=self.log_path,
                              cwd=self.home, die_with_parent=True)


def write_shim(bin_dir: Path, socket_path: Path, target: Path, *,
               answer_timeout_s: float = warm_shim.ANSWER_TIMEOUT_S) -> Path:
    """Write the ``flwr-clientapp`` shim (``warm_shim`` with its constants filled in)."""
    filled = Path(warm_shim.__file__).read_text(encoding="utf-8")
    for placeholder, value in (('SOCKET_PATH = ""', str(socket_path.absolute())),
                               ('TARGET = ""', str(target.absolute())),
                               (f"ANSWER_TIMEOUT_S = {warm_shim.ANSWER_TIMEOUT_S!r}",
                                float(answer_timeout_s))):
        if placeholder not in filled:
            raise RuntimeError(f"{warm_shim.__file__} lost its placeholder {placeholder!r}")
        name = placeholder.split(" = ")[0]
        filled = filled.replace(placeholder, f"{name} = {value!r}", 1)
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / CLIENTAPP
    # -I: ignore PYTHON* variables and the user site; -S: no site import (start-up time).
    write_text_atomic(shim, f"#!{sys.executable} -IS\n{filled}", mode=0o755)
    return shim
