"""Warm ClientApp launcher (issue #5 point 6): the ``flwr-clientapp`` shim and its fork
server, with a stand-in target script in place of Flower's real ``flwr-clientapp`` so that
each test runs in seconds. Real processes and sockets throughout; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client.flower_patches import WARM_PULL_BACKOFF, warm_message_pull
from client.node.daemon import (
    DaemonConfigError,
    _ForkServerKeeper,
    parse_config,
)
from client.node.supernode import TASK_POLL_ENV
from client.node.warm_launcher import (
    EDGE_PRELOAD,
    EXIT_CONFIG,
    TORCH_PRELOAD,
    WarmLauncher,
    write_shim,
)
from protocols.processes import ManagedProcess, process_state, wait_for

#: Reports what it got (JSON on stdout), writes to stderr, exits as told by its env.
STAND_IN = """\
#!{python}
import json, os, signal, sys, time
from pathlib import Path

preloaded = sorted(m for m in ("numpy", "json", "onnxruntime") if m in sys.modules)
mode = os.environ.get("STAND_IN_MODE", "report")
if mode == "sleep":
    def on_term(signum, frame):
        print("got signal", signum, flush=True)
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)
    Path(os.environ["STAND_IN_PIDFILE"] + ".tmp").write_text(str(os.getpid()))
    os.replace(os.environ["STAND_IN_PIDFILE"] + ".tmp", os.environ["STAND_IN_PIDFILE"])
    time.sleep(60)
if mode == "torch":
    import torch
    torch.set_num_threads(2)
    x = torch.randn(256, 256)
    print(json.dumps({{"torch_ok": bool(torch.isfinite(x @ x).all()),
                      "threads": torch.get_num_threads()}}))
    sys.exit(0)
print(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
                  "ppid": os.getppid(), "probe": os.environ.get("STAND_IN_PROBE"),
                  "preloaded": preloaded}}))
print("stand-in says hello on stderr", file=sys.stderr)
if mode == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
sys.exit(int(os.environ.get("STAND_IN_EXIT", "0")))
"""


def _stand_in(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stand_in.py"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def _start_sleeper(server: Server, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """A shim whose forked child will sleep (until a signal); returns the shim and the file
    where the child writes its PID once it runs."""
    pidfile = tmp_path / "child.pid"
    shim = subprocess.Popen([str(server.shim)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "STAND_IN_MODE": "sleep",
                                 "STAND_IN_PIDFILE": str(pidfile)})
    return shim, pidfile


def _sleeping_child(server: Server, tmp_path: Path) -> tuple[subprocess.Popen[str], int]:
    """A shim whose forked child sleeps; returns the shim and the child's PID."""
    shim, pidfile = _start_sleeper(server, tmp_path)
    wait_for(pidfile.exists, timeout=30, what="the child to start", interval=0.05)
    return shim, int(pidfile.read_text())


class Server:
    """A running fork server (real process) and the shim pointing at it."""

    def __init__(self, launcher: WarmLauncher, proc: ManagedProcess) -> None:
        self.launcher, self.proc = launcher, proc
        self.shim = launcher.bin_dir / "flwr-clientapp"

    def run(self, *args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.shim), *args], env={**os.environ, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture()
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[ManagedProcess] = []

    def start(preload: tuple[str, ...] = ("json",), *, wait: bool = True) -> Server:
        launcher = WarmLauncher(tmp_path / f"warm{len(started)}", preload=preload,
                                target=_stand_in(tmp_path / "bin"), term_grace_s=2.0)
        proc = launcher.start(dict(os.environ), "fork server")
        started.append(proc)
        if wait:
            wait_for(lambda: launcher.ready() or not proc.alive(), timeout=60,
                     what="the fork server", interval=0.05)
            assert proc.alive(), proc.log_tail()
        return Server(launcher, proc)

    yield start
    for proc in started:
        proc.stop()


# --- the warm path ---------------------------------------------------------------------------


def test_child_gets_argv_env_cwd_and_stdio_and_its_exit_code_comes_back(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    workdir = tmp_path / "work dir"
    workdir.mkdir()

    done = server.run("--token", "a b", "ü", env={"STAND_IN_PROBE": "p=1 2",
                                                  "STAND_IN_EXIT": "3"}, cwd=workdir)

    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["argv"] == ["--token", "a b", "ü"]
    assert report["probe"] == "p=1 2" and report["cwd"] == str(workdir)
    assert report["ppid"] == server.proc.pid, "forked by the server, not exec'd by the shim"
    assert "stand-in says hello on stderr" in done.stderr
    assert "cold" not in done.stderr
    assert server.launcher.socket_path.stat().st_mode & 0o777 == 0o600
    assert server.launcher.home.stat().st_mode & 0o777 == 0o700


def test_a_child_killed_by_a_signal_ends_the_shim_by_that_signal(
    start_server: Callable[..., Server]
) -> None:
    done = start_server().run(env={"STAND_IN_MODE": "signal"})

    assert done.returncode == -signal.SIGTERM
    assert json.loads(done.stdout)["ppid"] != os.getpid()


def test_signals_to_the_shim_reach_the_child(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    shim, _child = _sleeping_child(start_server(), tmp_path)
    try:
        os.kill(shim.pid, signal.SIGTERM)
        out, _ = shim.communicate(timeout=30)
    finally:
        shim.kill()
    assert shim.returncode == 7, "the child's SIGTERM handler chose the status"
    assert f"got signal {int(signal.SIGTERM)}" in out


def test_a_signal_forwarded_while_the_child_starts_is_not_lost(
    start_server: Callable[..., Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the forked child has put back its own handlers it would run the server's (which
    only note a stop): a SIGTERM forwarded then must wait, not vanish. A preloaded module
    holds every fork's child for 2 s right after the fork to open that window wide."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "slow_child_start.py").write_text(
        "import os, time\nos.register_at_fork(after_in_child=lambda: time.sleep(2.0))\n")
    monkeypatch.setenv("PYTHONPATH", str(modules))  # for the server and the shim alike
    shim, pidfile = _start_sleeper(start_server(("json", "slow_child_start")), tmp_path)
    try:
        time.sleep(0.7)  # the child is forked (or about to be) and held in the hook
        assert not pidfile.exists(), "the child was not held after the fork"
        os.kill(shim.pid, signal.SIGTERM)
        shim.communicate(timeout=30)
    finally:
        shim.kill()

    # Delivered once the child's default handler was back: it ended the ClientApp.
    assert shim.returncode == -signal.SIGTERM


def test_killing_the_shim_kills_the_child(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    shim, child = _sleeping_child(server, tmp_path)
    assert _alive(child)

    shim.kill()  # SIGKILL: no handler runs; only the dropped connection tells the server
    shim.wait(timeout=10)

    wait_for(lambda: not _alive(child), timeout=10, what=f"child {child} to be killed",
             interval=0.05)
    assert server.proc.alive(), "the server itself carries on"


def test_stopping_the_server_ends_running_children_and_their_shims(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = start_server()
    shim, child = _sleeping_child(server, tmp_path)

    server.proc.stop(timeout=10)  # ManagedProcess.stop: SIGTERM, as the daemon does

    assert shim.wait(timeout=10) == 7, "the child got SIGTERM and its status was relayed"
    assert not _alive(child)
    assert not server.launcher.socket_path.exists()
    assert server.proc.popen.returncode == 0


def test_the_fork_server_preloads_and_runs_no_thread(
    start_server: Callable[..., Server]
) -> None:
    server = start_server(("numpy", "json"))  # numpy starts OpenBLAS threads at import

    done = server.run()

    assert json.loads(done.stdout)["preloaded"] == ["json", "numpy"]
    tasks = os.listdir(f"/proc/{server.proc.pid}/task")
    assert tasks == [str(server.proc.pid)], "OpenBLAS's pool stopped at the probe fork"
    assert "1 thread(s)" in server.proc.log_tail()


def test_a_module_that_leaves_threads_is_refused_by_name(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "threaded_mod.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), "
        "daemon=True).start()\n")
    server = start_server(("json", "threaded_mod"), wait=False)

    assert server.proc.popen.wait(timeout=60) == EXIT_CONFIG
    assert "importing threaded_mod started Python thread(s)" in server.proc.log_tail()


def test_a_probe_child_stuck_at_fork_is_killed_and_refused() -> None:
    """A fork that deadlocks in the child must not hang the server's start-up."""
    script = (
        "import os, time\n"
        "from client.node import warm_child\n"
        "warm_child.PROBE_TIMEOUT_S = 0.5\n"
        "os.register_at_fork(after_in_child=lambda: time.sleep(60))\n"
        "try:\n"
        "    warm_child.check_fork_safe(after='stuck_mod')\n"
        "except warm_child.ForkSafetyError as err:\n"
        "    print(err)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, check=True)

    assert "a forked probe child did not exit within 0.5 s" in done.stdout
    assert "remove stuck_mod from the preload list" in done.stdout
    assert time.monotonic() - started < 20


#: What the fork server checks, run in a fresh interpreter: native threads that survive a
#: fork right after ``import onnxruntime``.
ORT_THREADS_AFTER_FORK = """
import os, onnxruntime
probe = os.fork()
if probe == 0:
    os._exit(0)
os.waitpid(probe, 0)
print(len(os.listdir("/proc/self/task")) - 1)
"""


@pytest.mark.slow
def test_preloading_onnxruntime_is_refused_exactly_when_its_threads_survive_fork(
    start_server: Callable[..., Server]
) -> None:
    """Why EDGE_PRELOAD leaves onnxruntime out. ORT 1.31's extension starts a timer thread
    at import on the development machine, maybe not on CI's: the refusal must follow what the
    library does on the machine at hand, and the server must end either way."""
    threads = int(subprocess.run([sys.executable, "-c", ORT_THREADS_AFTER_FORK], check=True,
                                 capture_output=True, text=True, timeout=60).stdout)
    server = start_server(("onnxruntime",), wait=False)

    wait_for(lambda: server.launcher.ready() or not server.proc.alive(), timeout=60,
             what="the fork server to serve or refuse", interval=0.05)
    if threads:
        assert server.proc.popen.wait(timeout=10) == EXIT_CONFIG, server.proc.log_tail()
        assert re.search(r"importing onnxruntime left \d+ native thread\(s\)",
                         server.proc.log_tail())
        assert "onnxruntime" not in EDGE_PRELOAD
    else:
        assert server.proc.alive(), server.proc.log_tail()
        # The stand-in imports json itself, before it looks.
        assert json.loads(server.run().stdout)["preloaded"] == ["json", "numpy", "onnxruntime"]


@pytest.mark.slow
def test_torch_preloaded_in_the_server_works_with_threads_in_the_child(
    start_server: Callable[..., Server]
) -> None:
    """Fork safety of TORCH_PRELOAD's heavy part on CPU: the child runs a 2-thread matmul."""
    server = start_server(("torch", "transformers", "peft"))

    done = server.run(env={"STAND_IN_MODE": "torch"})

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"torch_ok": True, "threads": 2}


def test_flowers_real_clientapp_entry_point_runs_warm(tmp_path: Path) -> None:
    """The production preload list and target: Flower's own ``flwr-clientapp`` script."""
    launcher = WarmLauncher(tmp_path / "warm", EDGE_PRELOAD)
    proc = launcher.start(dict(os.environ), "fork server")
    try:
        wait_for(lambda: launcher.ready() or not proc.alive(), timeout=120,
                 what="the fork server", interval=0.05)
        assert proc.alive(), proc.log_tail()
        t0 = time.perf_counter()
        done = subprocess.run([str(launcher.bin_dir / "flwr-clientapp"), "--help"],
                              capture_output=True, text=True, timeout=60)
        warm = time.perf_counter() - t0
    finally:
        proc.stop()
    assert done.returncode == 0, done.stderr
    assert "Run a Flower ClientApp" in done.stdout and "cold" not in done.stderr
    assert "forked ClientApp process" in proc.log_tail()
    assert "1 s retry backoff" not in proc.log_tail(), "warm_message_pull applied"
    print(f"flwr-clientapp --help through the warm shim: {warm:.3f} s")


def test_warm_clientapps_retry_their_message_pull_sooner(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from flwr.supernode.runtime import run_clientapp

    name = "pull_and_inflate_object_from_tree"  # what run_clientapp calls, by this name
    original = getattr(run_clientapp, name)
    monkeypatch.setattr(run_clientapp, name, original)

    with warm_message_pull() as applied, warm_message_pull() as again:
        assert applied and again  # idempotent

        tuned = getattr(run_clientapp, name)
        assert isinstance(tuned, functools.partial) and tuned.func is original
        assert tuned.keywords == WARM_PULL_BACKOFF
        assert WARM_PULL_BACKOFF["initial_backoff"] < 1.0  # Flower's own: 1 s, then 2, 4, ...
    assert getattr(run_clientapp, name) is original


# --- the cold fallback -----------------------------------------------------------------------


def test_without_a_server_the_shim_execs_the_real_program(tmp_path: Path) -> None:
    target = _stand_in(tmp_path / "bin")
    shim = write_shim(tmp_path / "shim", tmp_path / "nobody-listens.sock", target)

    done = subprocess.run([str(shim), "x"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "STAND_IN_EXIT": "5"})

    assert done.returncode == 5
    report = json.loads(done.stdout)
    assert report["argv"] == ["x"] and report["ppid"] == os.getpid(), "exec'd in place"
    assert "no fork server at" in done.stderr and "cold" in done.stderr


def test_a_server_that_never_answers_does_not_hold_the_message_up(tmp_path: Path) -> None:
    target = _stand_in(tmp_path / "bin")
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never answers
    wedged.bind(str(tmp_path / "wedged.sock"))
    wedged.listen(1)
    shim = write_shim(tmp_path / "shim", tmp_path / "wedged.sock", target,
                      answer_timeout_s=0.5)
    try:
        done = subprocess.run([str(shim)], capture_output=True, text=True, timeout=60)
    finally:
        wedged.close()

    assert done.returncode == 0
    assert json.loads(done.stdout)["ppid"] == os.getpid()
    assert "timed out" in done.stderr and "cold" in done.stderr


class ScriptedForkServer:
    """One end of the shim's wire protocol, played by the test step by step: what the
    shim does with a signal that arrives before it knows its child depends on timing that a
    real fork server cannot hold still."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "scripted.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.listener.settimeout(30)

    def accept_request(self) -> dict[str, Any]:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(30)
        self.reader = self.conn.makefile("rb")
        size = int.from_bytes(self.reader.read(4), "big")
        request: dict[str, Any] = json.loads(self.reader.read(size))
        self.fd_count = len(request["fds"])
        return request

    def say(self, **answer: Any) -> None:
        self.conn.sendall(json.dumps(answer).encode() + b"\n")

    def start_child(self, pid: int = 424242) -> None:
        """Answer as a fork server that forked ``pid``: ready, take the descriptors, pid."""
        self.say(ready=True)
        _, fds, _, _ = socket.recv_fds(self.conn, 1, self.fd_count)
        for fd in fds:
            os.close(fd)
        self.say(pid=pid)

    def close(self) -> None:
        for closable in (getattr(self, "reader", None), getattr(self, "conn", None),
                         self.listener):
            if closable is not None:
                closable.close()


def _shim_with_signal_pending(tmp_path: Path) -> tuple[ScriptedForkServer, Any]:
    """A shim that has sent its request and then got SIGTERM, before any answer."""
    server = ScriptedForkServer(tmp_path)
    shim_path = write_shim(tmp_path / "shim", server.path, _stand_in(tmp_path / "bin"))
    shim = subprocess.Popen([str(shim_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    server.accept_request()
    os.kill(shim.pid, signal.SIGTERM)
    time.sleep(0.3)  # delivered by now: with the default action the shim would be gone
    assert shim.poll() is None, "a signal during the handshake must not kill the shim"
    return server, shim


def test_a_signal_before_the_child_is_known_is_forwarded_once_it_is(tmp_path: Path) -> None:
    server, shim = _shim_with_signal_pending(tmp_path)
    try:
        server.start_child()
        forwarded = json.loads(server.reader.readline())
        server.say(exit=7)
        shim.communicate(timeout=30)
    finally:
        shim.kill()
        server.close()

    assert forwarded == {"signal": int(signal.SIGTERM)}
    assert shim.returncode == 7, "the child's status, not the signal's"


def test_a_signal_before_a_cold_start_ends_the_shim_as_it_would_the_program(
    tmp_path: Path
) -> None:
    server, shim = _shim_with_signal_pending(tmp_path)
    try:
        server.say(refused="scripted refusal")
        out, err = shim.communicate(timeout=30)
    finally:
        shim.kill()
        server.close()

    assert shim.returncode == -signal.SIGTERM
    assert out == "", "the real program was not started after the stop request"
    assert f"got signal {int(signal.SIGTERM)} before starting" in err


def test_a_child_killed_by_sigkill_ends_the_shim_by_sigkill(tmp_path: Path) -> None:
    server = ScriptedForkServer(tmp_path)
    shim = subprocess.Popen([str(write_shim(tmp_path / "shim", server.path,
                                            _stand_in(tmp_path / "bin")))])
    try:
        server.accept_request()
        server.start_child()
        server.say(killed=int(signal.SIGKILL))
        shim.wait(timeout=30)
    finally:
        shim.kill()
        server.close()
    assert shim.returncode == -signal.SIGKILL


def test_a_signal_the_shim_was_started_ignoring_is_not_forwarded(tmp_path: Path) -> None:
    """Under nohup the real program would ignore SIGHUP; so does the warm child."""
    server = ScriptedForkServer(tmp_path)
    shim = subprocess.Popen(
        [str(write_shim(tmp_path / "shim", server.path, _stand_in(tmp_path / "bin")))],
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        server.accept_request()
        server.start_child()
        time.sleep(0.3)  # the shim relays from here on
        os.kill(shim.pid, signal.SIGHUP)
        os.kill(shim.pid, signal.SIGUSR1)
        forwarded = [json.loads(server.reader.readline())]
        server.say(exit=0)
        shim.wait(timeout=30)
        forwarded += [json.loads(line) for line in server.reader.read().splitlines()]
    finally:
        shim.kill()
        server.close()
    assert forwarded == [{"signal": int(signal.SIGUSR1)}], "SIGHUP was not passed on"
    assert shim.returncode == 0


def test_a_refused_request_runs_cold(start_server: Callable[..., Server]) -> None:
    server = start_server()

    # PYTHON* variables act at interpreter start-up, which a forked child never has.
    done = server.run("y", env={"PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "3"})

    assert done.returncode == 0
    assert json.loads(done.stdout)["ppid"] == os.getpid()
    assert ("the fork server refused: ['OMP_NUM_THREADS', 'PYTHONHASHSEED'] differ"
            in done.stderr)


# --- wiring into the daemon ------------------------------------------------------------------


def _daemon_raw(**node: Any) -> dict[str, Any]:
    return {"superlink": {"address": "127.0.0.1:9093", "insecure": True},
            "node": {"state_dir": "s", **node}, "data": {"path": "."}}


def test_the_daemon_puts_the_shim_first_on_the_supernodes_path(tmp_path: Path) -> None:
    warm = parse_config(_daemon_raw(), tmp_path)
    cold = parse_config(_daemon_raw(warm_clientapp=False), tmp_path)

    env = warm.supernode_spec().environment()
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "s" / "warm" / "bin")
    assert env[TASK_POLL_ENV] == "0.25"
    assert warm.warm_launcher().preload == TORCH_PRELOAD  # kind = "gpu" by default
    cold_path = cold.supernode_spec().environment()["PATH"].split(os.pathsep)
    assert str(tmp_path / "s" / "warm" / "bin") not in cold_path
    edge = parse_config(_daemon_raw(kind="edge", warm_preload=["json"]), tmp_path)
    assert edge.warm_launcher().preload == ("json",)


@pytest.mark.parametrize(
    ("node", "message"),
    [({"warm_preload": 3}, "node.warm_preload = 3: expected a list of strings"),
     ({"warm_preload": ["numpy; rm"]}, "is not a module name"),
     ({"state_dir": "d" * 120}, "Unix sockets allow 107")],
    ids=["not-a-list", "bad-name", "socket-path-too-long"],
)
def test_bad_warm_settings_are_refused_by_name(tmp_path: Path, node: dict[str, Any],
                                               message: str) -> None:
    with pytest.raises(DaemonConfigError, match=message):
        parse_config(_daemon_raw(**node), tmp_path)


def test_the_daemon_restarts_a_dead_fork_server_and_gives_up_on_a_bad_preload(
    tmp_path: Path
) -> None:
    target = _stand_in(tmp_path / "bin")
    keeper = _ForkServerKeeper(WarmLauncher(tmp_path / "warm", ("json",), target),
                               dict(os.environ), "node")
    try:
        keeper.check()
        assert keeper.proc is not None
        first = keeper.proc
        wait_for(keeper.launcher.ready, timeout=60, what="the fork server", interval=0.05)
        first.popen.kill()
        first.popen.wait(timeout=10)
        keeper.check()  # notices; restarts after the 1 s backoff
        assert keeper.proc is None
        def restarted() -> bool:
            keeper.check()
            return keeper.proc is not None

        wait_for(restarted, timeout=10, what="the restart", interval=0.05)
        assert keeper.proc is not first and keeper.proc.alive()
        wait_for(keeper.launcher.ready, timeout=60, what="the restarted fork server", interval=0.05)
    finally:
        keeper.stop()

    bad = _ForkServerKeeper(WarmLauncher(tmp_path / "bad", ("no_such_module_xyz",), target),
                            dict(os.environ), "node")
    try:
        bad.check()
        assert bad.proc is not None
        bad.proc.popen.wait(timeout=60)
        bad.check()
        assert bad.gave_up and bad.proc is None
    finally:
        bad.stop()


# --- the SuperNode's idle poll -------------------------------------------------------------


def test_supernode_entry_shortens_only_flowers_two_sleeps(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import time as real_time
    import types

    from client.flower_patches import short_supernode_sleeps

    slept: list[float] = []
    monkeypatch.setattr(real_time, "sleep", slept.append)
    module = types.ModuleType("fake_start_client_internal")
    module.time = real_time  # type: ignore[attr-defined]
    with short_supernode_sleeps(0.4, module) as applied:
        assert applied
        module.time.sleep(3)  # type: ignore[attr-defined]  # the idle poll
        module.time.sleep(0.5)  # type: ignore[attr-defined]  # waiting for the ClientApp
        module.time.sleep(7)  # type: ignore[attr-defined]  # anything else is untouched
        assert slept == [0.4, 0.1, 7]
        assert module.time.monotonic is real_time.monotonic  # type: ignore[attr-defined]
    assert module.time is real_time  # type: ignore[attr-defined]
    with short_supernode_sleeps(0.4, types.ModuleType("moved")) as applied:
        assert not applied, "unpatched when Flower moved"


def test_supernode_entry_patches_the_installed_flower() -> None:
    from flwr.supernode import start_client_internal

    from client.node import supernode_entry as entry

    assert start_client_internal.time is __import__("time"), \
        "flwr's start_client_internal changed: review client/flower_patches.py"
    assert entry.poll_interval({}) == entry.DEFAULT_POLL_S
    assert entry.poll_interval({entry.POLL_ENV: "0.5"}) == 0.5
    with pytest.raises(ValueError, match=r"expected 0\.05 to 3"):
        entry.poll_interval({entry.POLL_ENV: "10"})
    with pytest.raises(ValueError, match="expected seconds"):
        entry.poll_interval({entry.POLL_ENV: "fast"})
