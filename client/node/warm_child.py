"""The child side of the warm launcher's fork server (:mod:`warm_forkserver`): checking that
forking is safe before serving, and turning a forked child into the process the
``flwr-clientapp`` shim would have exec'd.

Fork safety: forking a process that runs other threads leaves the child without them and
with whatever locks they held. :func:`check_fork_safe` (run after each preloaded module)
forks a probe child and checks that no Python thread and no native thread survives:
OpenBLAS pools pass (they shut down in their own ``pthread_atfork`` handler); onnxruntime
1.31 fails on some machines (its extension module starts a timer thread at import on ours,
not on every machine), so edge devices never preload it and leave it to the child, ~0.1 s. A probe
stuck on a lock is killed after :data:`PROBE_TIMEOUT_S` and counts as a failure. CUDA must
not be initialised before forking (importing torch does not). Flower's ClientApp talks HTTP
(httpx) to its SuperNode and opens that client in the child. The child re-seeds numpy's
global generator (the ``random`` module re-seeds itself), gets the original signal handlers
(restored by the server), and keeps Flower's and fedtune's log handlers, which write to fd
2, now the shim's stderr: as a new interpreter would have them.

One Flower setting changes for warm children, the retry backoff of their message pull
(:func:`client.flower_patches.warm_message_pull`, applied by the fork server after its
preload and inherited by every child).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn


class ForkSafetyError(RuntimeError):
    """A preloaded module left a thread (or CUDA) behind: forking would be unsafe."""


@dataclass(frozen=True)
class Job:
    """What a forked child runs: the shim's request."""

    target: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    fds: dict[int, int]  # std fd (0, 1, 2) -> descriptor received from the shim


def run_job(job: Job) -> NoReturn:
    """In the forked child: become the process the shim would have exec'd, run the target
    script as ``__main__``, and exit as Python would, minus tearing down every module.

    That teardown (freeing each object of Flower's and fedtune's modules) took ~1.3 s per
    process here and has no effect outside the process; like ``multiprocessing``'s forked
    workers, the child waits for its non-daemon threads, runs the ``atexit`` handlers,
    flushes stdio and leaves with ``os._exit``.
    """
    for std in (0, 1, 2):
        source = job.fds.get(std)
        if source is None:
            source = os.open(os.devnull, os.O_RDWR)
            job.fds[std] = source
        os.dup2(source, std)
    for fd in set(job.fds.values()) - {0, 1, 2}:
        os.close(fd)
    os.chdir(job.cwd)
    os.environ.clear()
    os.environ.update(job.env)
    sys.argv = list(job.argv)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # a new interpreter would seed it from the OS
    code, interrupted = 0, False
    try:
        runpy.run_path(job.target, run_name="__main__")
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException as err:  # what the interpreter does with an uncaught exception
        sys.excepthook(type(err), err, err.__traceback__)
        code, interrupted = 1, isinstance(err, KeyboardInterrupt)
    _exit(code, interrupted=interrupted)


def _exit_code(value: object) -> int:
    """``sys.exit(value)``'s status, as the interpreter computes it."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    with contextlib.suppress(Exception):
        print(value, file=sys.stderr)
    return 1


def _exit(code: int, *, interrupted: bool = False) -> NoReturn:
    """Interpreter shutdown without module teardown (what ``multiprocessing`` does in a
    forked worker, with the same CPython internals)."""
    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads (CPython)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()  # logging.shutdown and whatever the ClientApp registered
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if interrupted:  # an uncaught KeyboardInterrupt ends the process by SIGINT (bpo-1054041)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def check_fork_safe(after: str = "start-up") -> None:
    """Raise :class:`ForkSafetyError` if forking now would leave a thread behind."""
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        raise ForkSafetyError(f"importing {after} started Python thread(s) {threads}; a "
                              f"forked child would lack them: remove {after} from the "
                              "preload list")
    probe = os.fork()  # pthread_atfork handlers (OpenBLAS) stop their pools here
    if probe == 0:
        os._exit(0)
    _reap_probe(probe, after)
    native = task_count() - 1
    if native > 0:
        raise ForkSafetyError(f"importing {after} left {native} native thread(s) running "
                              "across fork(); a forked child would lack them and could "
                              f"deadlock on their locks: remove {after} from the preload list "
                              "(the ClientApp process then imports it itself)")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise ForkSafetyError(f"importing {after} initialised CUDA, which does not survive "
                              "fork(): remove it from the preload list")


#: How long the probe child of :func:`check_fork_safe` may take to exit. It only runs the
#: ``pthread_atfork`` child handlers and ``_exit``; one that takes longer is stuck on a lock
#: another thread held at fork, the very failure the probe is there to find.
PROBE_TIMEOUT_S = 10.0


def _reap_probe(probe: int, after: str) -> None:
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while os.waitpid(probe, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(probe, signal.SIGKILL)
            os.waitpid(probe, 0)
            raise ForkSafetyError(f"after importing {after}, a forked probe child did not "
                                  f"exit within {PROBE_TIMEOUT_S:g} s (a lock held across "
                                  f"fork()): remove {after} from the preload list")
        time.sleep(0.005)


def task_count() -> int:
    """Threads of this process, native ones included (Linux ``/proc``)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()
