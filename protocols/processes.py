"""Start Flower's daemons with a known environment and stop them, with their children.

Flower's processes spawn more processes: a SuperLink starts ``flower-superexec`` in a new
session (so it leaves our process group), which starts one ``flwr-serverapp`` per run; a
SuperNode starts ``flower-superexec``, which starts one ``flwr-clientapp`` per message.
They watch their parent's PID, but only loosely. :meth:`ManagedProcess.stop` therefore
collects the whole tree from ``/proc`` first and then ends every process in it by PID.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from protocols.environment import DEFAULTS

log = logging.getLogger(__name__)

#: The process environment of protocols/environment.py (no telemetry or update checks, no
#: runtime ``uv sync``, no hub access), imposed on every Flower daemon we start, with
#: unbuffered output so their logs are current.
FLOWER_ENV = {**DEFAULTS, "PYTHONUNBUFFERED": "1"}


def bin_dir() -> Path:
    """The folder holding ``flower-superlink`` & co.: the running interpreter's."""
    return Path(sys.executable).parent


def flower_tool(name: str) -> str:
    """Absolute path of a Flower console script installed beside this interpreter."""
    path = bin_dir() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: install flwr==1.41.0 into this environment "
            "(pip install fedtune)"
        )
    return str(path)


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Flower process: ours over the caller's, FLWR_HOME set, and
    this interpreter's bin folder first on PATH (Flower starts ``flower-superexec``,
    ``flwr-serverapp`` and ``flwr-clientapp`` by bare name)."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    env.update(extra or {})
    return env


#: Set by :class:`ManagedProcess` ``(die_with_parent=True)``: the pid the child must not
#: outlive. Read by :func:`die_with_parent` in the child.
PARENT_ENV = "FEDTUNE_DIE_WITH_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """First thing in a daemon's child (the SuperNode entry, the warm fork server): ask
    Linux to SIGTERM this process when the process that started it dies, so a daemon
    killed with SIGKILL leaves no SuperNode training on as an orphan (issue 13). If that
    parent is already gone, exit at once. A no-op unless started with ``die_with_parent``
    and on Linux.

    Done in the child rather than with ``preexec_fn``: ``preexec_fn`` is unsafe in a
    process with threads (the daemons run beside threads), and the child is our own code.
    """
    expected = os.environ.pop(PARENT_ENV, "")  # not for this process's own children
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("PR_SET_PDEATHSIG failed (errno %d); this process may outlive its "
                    "parent", ctypes.get_errno())
        return
    if os.getppid() != int(expected):  # the parent died before the call above
        os._exit(0)


class ManagedProcess:
    """One started daemon, its output appended to ``log_path``; stop it with :meth:`stop`.

    ``die_with_parent``: the child (if it calls :func:`die_with_parent`) is terminated when
    this process dies, however it dies.
    """

    def __init__(self, name: str, command: Sequence[str], *, env: Mapping[str, str],
                 log_path: Path, cwd: Path | None = None,
                 die_with_parent: bool = False) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._ended = False  # stop() or kill() finished: a second call does nothing
        log.info("starting %s: %s", name, " ".join(self.command))
        env = {**env, PARENT_ENV: str(os.getpid())} if die_with_parent else dict(env)
        self.popen = subprocess.Popen(
            self.command, env=env, cwd=cwd, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the process's log, for error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process and every descendant (by PID); SIGKILL what outlives
        ``timeout``. Safe to call twice: the second call does nothing (the pid, reaped by
        then, may belong to an unrelated process)."""
        if self._ended:
            return
        tree = [self.pid, *descendants(self.pid)]
        if self.alive():
            _signal(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it",
                            self.name, self.pid, timeout)
                _signal(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Children started after our snapshot (a ClientApp mid-message) are found again.
        leftovers = [p for p in dict.fromkeys(tree[1:] + descendants(self.pid)) if _exists(p)]
        for pid in leftovers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + min(timeout, 5.0)
        while time.monotonic() < deadline and any(_exists(p) for p in leftovers):
            time.sleep(0.1)
        for pid in leftovers:
            if _exists(pid):
                _signal(pid, signal.SIGKILL)
        self._ended = True
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the process and its whole tree at once — a power cut, not a shutdown:
        nothing gets to clean up (fault-injection tests and load scripts use it).

        The tree is frozen first (SIGSTOP, until each process is seen stopped) and scanned
        until no new process appears: a process forked while the tree was being killed (a
        ClientApp the fork server just started) would otherwise outlive it and could still
        answer its message. Only processes this call stopped are killed, and they are
        killed even if the scan fails. A second call (or one after stop()) does nothing."""
        if self._ended:
            return
        frozen: list[int] = []
        try:
            while new := [p for p in [self.pid, *descendants(self.pid)] if p not in frozen]:
                stopped = [pid for pid in new if _signal(pid, signal.SIGSTOP)]
                _wait_stopped(stopped)
                frozen += stopped
                if not stopped:  # every new one was already gone
                    break
        finally:
            for pid in frozen:
                _signal(pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self._ended = True
        self._log.close()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``, plus members of the session-less process group ``pid``
    leads (a child orphaned when its parent died early keeps our group id), from Linux
    ``/proc``; empty elsewhere."""
    children: dict[int, list[int]] = {}
    in_group: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces): state, ppid, pgrp.
        _state, ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        children.setdefault(int(ppid), []).append(int(entry.name))
        if int(pgrp) == pid:
            in_group.append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return list(dict.fromkeys(found + in_group))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_state(pid) != "Z"  # a zombie is gone for our purposes (its parent reaps it)


def process_state(pid: int) -> str | None:
    """The process's state letter from Linux ``/proc`` (``R``, ``S``, ``T``, ``Z``, ...), or
    None if it cannot be read (gone, or not Linux)."""
    try:
        # The command name (in parentheses) may contain spaces; the state follows it.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _signal(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig``; False if the process had already exited."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


#: ``/proc`` states of a process that SIGSTOP has reached, or that no longer runs.
_STOPPED_OR_GONE = (None, "T", "t", "Z", "X")


def _wait_stopped(pids: Sequence[int], timeout: float = 2.0) -> None:
    """Until every process is stopped, a zombie or gone (SIGSTOP is asynchronous: one in
    the middle of fork() finishes it first)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while process_state(pid) not in _STOPPED_OR_GONE and time.monotonic() < deadline:
            time.sleep(0.001)


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.5,
             process: ManagedProcess | None = None) -> None:
    """Poll ``predicate()`` until true; fail with ``what`` and the process log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and not process.alive():
            raise RuntimeError(
                f"{process.name} exited with status {process.popen.returncode} before "
                f"{what}; its log ({process.log_path}) ends with:\n{process.log_tail()}"
            )
        time.sleep(interval)
    tail = f"; {process.name}'s log ends with:\n{process.log_tail()}" if process else ""
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
