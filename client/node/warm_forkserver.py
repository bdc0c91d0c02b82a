"""The warm launcher's fork server (see :mod:`warm_launcher` for why it exists):

    python -m client.node.warm_forkserver --socket S --target flwr-clientapp \\
        --preload numpy,flwr.supernode.cli,...

It imports the preload list, then serves the ``flwr-clientapp`` shims (:mod:`warm_shim`,
whose docstring holds the wire protocol) on a Unix socket with a single-threaded
``poll()`` loop: per request it forks a child, which takes over the shim's stdio, argv,
environment and cwd and runs the target script as ``__main__``; the server relays the
child's exit status and the shim's signals, and kills a child whose shim went away.

Fork safety (what may be preloaded, what a child re-initialises) is in :mod:`warm_child`;
the one Flower setting warm children change, :func:`client.flower_patches.warm_message_pull`,
is in force while the server serves. The server itself starts no thread and opens no network
channel: a Unix socket, ``poll()``, and SIGCHLD through ``signal.set_wakeup_fd``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.flower_patches import warm_message_pull
from client.node import warm_shim
from client.node.warm_child import ForkSafetyError, Job, check_fork_safe, run_job, task_count
from protocols.processes import die_with_parent

log = logging.getLogger("fedtune.warm_forkserver")  # not __main__: the child drops its handler

TERM_GRACE_S = 5.0  # SIGTERM → SIGKILL for a child whose shim went away
_REQUEST_TIMEOUT_S = 5.0
_MAX_REQUEST_BYTES = 1 << 20
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Blocked from just before a fork until the child has its own handlers back.
_HELD_ACROSS_FORK = {*_STOP_SIGNALS, signal.SIGCHLD, *warm_shim.FORWARDED}
_PR_SET_PDEATHSIG = 1
#: Environment read before a forked child exists (interpreter start-up, BLAS/OpenMP library
#: load, Flower's logger at import): a shim whose values differ must run cold.
_STARTUP_ENV_PREFIXES = ("PYTHON", "OMP_", "OPENBLAS_", "MKL_", "FLWR_LOG_LEVEL")
#: The fork server's exit status when its preload list cannot work (a module is missing or
#: not fork-safe): restarting it cannot help, so the daemon runs ClientApps cold instead.
EXIT_CONFIG = 78  # EX_CONFIG
@dataclass
class _Child:
    pid: int
    conn: socket.socket | None
    started: float = field(default_factory=time.monotonic)
    pending: bytes = b""
    kill_at: float | None = None  # SIGKILL then, unless it exited (set by SIGTERM)
    killed: bool = False


class ForkServer:
    """Forks a ClientApp process per shim request; see the module docstring."""

    def __init__(self, socket_path: Path, target: Path, *,
                 term_grace_s: float = TERM_GRACE_S) -> None:
        self.socket_path = socket_path.absolute()
        self.target = str(target.absolute())
        self.term_grace_s = term_grace_s
        self._pid = os.getpid()
        self._handlers = {s: signal.getsignal(s) for s in (*_STOP_SIGNALS, signal.SIGCHLD)}
        self._mask: set[int | signal.Signals] = set()  # the signal mask before a fork
        self._startup_env = _startup_env(os.environ)
        self._children: dict[int, _Child] = {}
        self._by_fd: dict[int, _Child] = {}
        self._stopping = False
        self._libc = ctypes.CDLL(None, use_errno=True)

    # --- before serving ---------------------------------------------------------------------

    def preload(self, modules: Sequence[str]) -> None:
        for name in modules:
            started = time.perf_counter()
            importlib.import_module(name)
            check_fork_safe(after=name)
            log.info("preloaded %s (%.2f s)", name, time.perf_counter() - started)
        numpy = sys.modules.get("numpy")
        if numpy is not None:  # its first seed() imports more (~40 ms); run_job seeds again
            numpy.random.seed()
            check_fork_safe(after="numpy.random.seed()")

    # --- serving ----------------------------------------------------------------------------

    def serve(self) -> Job | None:
        """Serve until SIGTERM/SIGINT/SIGHUP and every child is gone (returns None), or, in
        a forked child, return the job it must run."""
        bound = _listen(self.socket_path)
        listener: socket.socket | None = bound
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake poll() up
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_stop)
        poller = select.poll()
        poller.register(bound, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        log.info("fork server %d ready on %s (%d modules loaded, %d thread(s))", self._pid,
                 self.socket_path, len(sys.modules), task_count())
        try:
            while not (self._stopping and not self._children):
                if self._stopping and listener is not None:
                    poller.unregister(listener)
                    listener.close()
                    listener = None
                    self.socket_path.unlink(missing_ok=True)
                    for child in self._children.values():
                        self._terminate(child, signal.SIGTERM)
                for fd, _event in poller.poll(self._timeout_ms()):
                    if fd == wake_r.fileno():
                        _drain(wake_r)
                    elif listener is not None and fd == listener.fileno():
                        job = self._accept(listener, poller)
                        if job is not None:  # this is the forked child
                            self._close_in_child(listener, wake_r, wake_w)
                            return job
                    elif fd in self._by_fd:
                        self._from_shim(self._by_fd[fd], poller)
                self._reap(poller)
                self._enforce_deadlines()
        finally:
            if os.getpid() == self._pid:
                signal.set_wakeup_fd(-1)
                if listener is not None:
                    listener.close()
                    self.socket_path.unlink(missing_ok=True)
        log.info("fork server %d stopped", self._pid)
        return None

    def _on_stop(self, signum: int, _frame: object) -> None:
        if not self._stopping:
            log.info("fork server got signal %d: stopping its %d ClientApp process(es)",
                     signum, len(self._children))
        self._stopping = True

    def _timeout_ms(self) -> int:
        deadlines = [c.kill_at for c in self._children.values()
                     if c.kill_at is not None and not c.killed]
        if not deadlines:
            return -1
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _accept(self, listener: socket.socket, poller: select.poll) -> Job | None:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(_REQUEST_TIMEOUT_S)
            request = _read_request(conn)
            job = _parse_job(request)
            refusal = self._refusal(conn, request, job)
            if not refusal:  # only now the shim hands over its descriptors
                if not _send(conn, {"ready": True}, blocking_after=True):
                    raise ConnectionError("the shim left before sending its descriptors")
                fds = _receive_fds(conn, len(job.fds))
                job.fds.update(zip(list(job.fds), fds, strict=True))
        except (OSError, ValueError) as err:
            refusal = f"unreadable request ({err})"
        if refusal:
            log.warning("refused a ClientApp start: %s", refusal)
            _close_fds(fds)
            _send(conn, {"refused": refusal})
            conn.close()
            return None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # Signals wait (blocked) across the fork: until the child has put back the
        # ClientApp's handlers, a forwarded SIGTERM would reach the server's _on_stop in the
        # child and be lost; the child unblocks them at the end of _close_in_child.
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_ACROSS_FORK)
        pid = os.fork()
        if pid == 0:
            conn.close()
            return job
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        _close_fds(fds)
        child = _Child(pid, conn)
        self._children[pid] = child
        log.info("forked ClientApp process %d", pid)
        if not _send(conn, {"pid": pid}):
            self._terminate(child, signal.SIGTERM)
            return None
        conn.setblocking(False)
        poller.register(conn, select.POLLIN)
        self._by_fd[conn.fileno()] = child
        return None

    def _refusal(self, conn: socket.socket, request: Mapping[str, object], job: Job) -> str:
        """Why this request must run cold (empty: it may run warm)."""
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            return f"peer uid {uid} is not this server's uid {os.getuid()}"
        if self._stopping:
            return "the fork server is stopping"
        if request.get("protocol") != warm_shim.PROTOCOL:
            return (f"shim protocol {request.get('protocol')!r}, server protocol "
                    f"{warm_shim.PROTOCOL}: reinstall the shim")
        if job.target != self.target:
            return f"the shim runs {job.target!r}, this server {self.target!r}"
        if (differ := sorted(set(_startup_env(job.env).items())
                             ^ set(self._startup_env.items()))):
            return (f"{sorted({k for k, _ in differ})} differ from the fork server's "
                    "environment; they act at interpreter start-up or import, which a forked "
                    "child skips")
        return ""

    def _from_shim(self, child: _Child, poller: select.poll) -> None:
        assert child.conn is not None
        try:
            data = child.conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the shim exited or was killed: its ClientApp must not outlive it
            log.warning("the shim of ClientApp process %d went away; terminating it", child.pid)
            self._drop_conn(child, poller)
            self._terminate(child, signal.SIGTERM)
            return
        child.pending += data
        *lines, child.pending = child.pending.split(b"\n")
        for line in lines:
            try:
                signum = int(json.loads(line)["signal"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignored a bad line from the shim of %d: %r", child.pid, line)
                continue
            if signum in warm_shim.FORWARDED:
                os.kill(child.pid, signum)  # not reaped yet, so the PID is still ours

    def _reap(self, poller: select.poll) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            log.info("ClientApp process %d %s after %.1f s", pid,
                     f"exited with {code}" if code >= 0 else f"was killed by signal {-code}",
                     time.monotonic() - child.started)
            if child.conn is not None:
                _send(child.conn, {"exit": code} if code >= 0 else {"killed": -code})
                self._drop_conn(child, poller)

    def _drop_conn(self, child: _Child, poller: select.poll) -> None:
        if child.conn is not None:
            self._by_fd.pop(child.conn.fileno(), None)
            poller.unregister(child.conn)
            child.conn.close()
            child.conn = None

    def _terminate(self, child: _Child, sig: signal.Signals) -> None:
        if child.kill_at is None:
            child.kill_at = time.monotonic() + self.term_grace_s
            os.kill(child.pid, sig)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for child in self._children.values():
            if child.kill_at is not None and not child.killed and now >= child.kill_at:
                log.warning("ClientApp process %d outlived SIGTERM by %.0f s; killing it",
                            child.pid, self.term_grace_s)
                os.kill(child.pid, signal.SIGKILL)
                child.killed = True

    def _close_in_child(self, *sockets: socket.socket) -> None:
        """In the forked child: drop the server's sockets and signal set-up, and die with
        the server (so a killed server leaves no ClientApp behind)."""
        signal.set_wakeup_fd(-1)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        for sock in (*sockets, *(c.conn for c in self._children.values() if c.conn)):
            sock.close()
        self._children.clear()
        self._by_fd.clear()
        if self._libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or \
                os.getppid() != self._pid:
            os._exit(warm_shim.EXIT_LOST)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)  # held signals arrive now
        log.handlers.clear()
        log.disabled = True


def _startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables read when the interpreter starts or a preloaded module is imported."""
    return {k: v for k, v in env.items() if k.startswith(_STARTUP_ENV_PREFIXES)}


def _listen(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()
    # Bound and listening under a temporary name, then renamed into place: the launcher's
    # ready() (the path exists) never sees a socket that would still refuse connections.
    staging = path.with_name(f".{os.getpid():x}")  # no longer than the usual name
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(staging))
        staging.chmod(0o600)
        sock.listen(64)
        os.rename(staging, path)
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    finally:
        os.umask(old_umask)
    return sock


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise ConnectionError("the shim closed the connection mid-request")
        data += more
    return data


def _read_request(conn: socket.socket) -> dict[str, object]:
    (size,) = struct.unpack("!I", _read_exact(conn, 4))
    if size > _MAX_REQUEST_BYTES:
        raise ValueError(f"request of {size} bytes (limit {_MAX_REQUEST_BYTES})")
    request = json.loads(_read_exact(conn, size))
    if not isinstance(request, dict):
        raise ValueError("request is not a JSON object")
    return request


def _receive_fds(conn: socket.socket, count: int) -> list[int]:
    """The shim's stdio descriptors (SCM_RIGHTS), sent with one marker byte."""
    marker, fds, _flags, _addr = socket.recv_fds(conn, 1, 3)
    if marker != warm_shim.FDS_MARKER or len(fds) != count:
        _close_fds(fds)
        raise ValueError(f"expected {count} descriptors after {warm_shim.FDS_MARKER!r}, got "
                         f"{len(fds)} after {marker!r}")
    return fds


def _parse_job(request: Mapping[str, object]) -> Job:
    """The shim's request as a job, with every field's type checked (ValueError if not);
    its descriptors arrive later (``fds`` maps each std fd to -1 until then)."""
    target, argv, env, cwd, sent = (request.get(k) for k in ("target", "argv", "env", "cwd",
                                                               "fds"))
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise ValueError(f"argv {argv!r}: expected a non-empty list of strings")
    if not (isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("env: expected an object of strings")
    if not isinstance(target, str) or not isinstance(cwd, str):
        raise ValueError(f"target {target!r} / cwd {cwd!r}: expected strings")
    if not (isinstance(sent, list) and set(sent) <= {0, 1, 2} and len(set(sent)) == len(sent)):
        raise ValueError(f"descriptor list {sent!r}: expected distinct entries of 0, 1, 2")
    return Job(target, argv, env, cwd, dict.fromkeys(sent, -1))


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _send(conn: socket.socket, message: Mapping[str, object], *,
          blocking_after: bool = False) -> bool:
    """Send one JSON line; leave the socket non-blocking (for poll) unless asked."""
    try:
        conn.setblocking(True)
        conn.sendall(json.dumps(message).encode() + b"\n")
        return True
    except OSError:
        return False
    finally:
        if blocking_after:
            conn.settimeout(_REQUEST_TIMEOUT_S)
        else:
            conn.setblocking(False)


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client.node.warm_forkserver",
        description="Fork server behind the warm flwr-clientapp shim (started by `fedtune "
        "client`): preloads modules, then forks one ClientApp process per shim request.")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to serve on")
    parser.add_argument("--target", type=Path, required=True,
                        help="the real flwr-clientapp script each child runs as __main__")
    parser.add_argument("--preload", default="",
                        help="comma-separated modules to import before serving")
    parser.add_argument("--term-grace", type=float, default=TERM_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL for an orphaned child")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()  # a SIGKILLed daemon must not leave its fork server behind
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if not args.target.is_file():
        log.error("target %s does not exist", args.target)
        return 2
    for std in (0, 1, 2):  # received descriptors must land above 2 (see run_job)
        try:
            os.fstat(std)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), std)
    sys.path[0] = str(args.target.parent)  # what `python <target>` would have there
    server = ForkServer(args.socket, args.target, term_grace_s=args.term_grace)
    try:
        check_fork_safe()
        server.preload([m for m in args.preload.split(",") if m])
    except (ForkSafetyError, ImportError) as err:
        log.error("cannot serve warm ClientApps (they start cold): %s", err)
        # Leave without interpreter teardown: the module just refused may have native
        # threads whose static destructors block a normal exit, and the shim is waiting.
        logging.shutdown()
        os._exit(EXIT_CONFIG)
    with warm_message_pull() as tuned:  # after the preload: patches what it loaded
        if not tuned:
            log.warning("Flower's ClientApp runtime is not preloaded or has changed: warm "
                        "ClientApps pull their message with Flower's 1 s retry backoff")
        job = server.serve()
        if job is not None:  # a forked child: runs the ClientApp, leaves by os._exit
            run_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
