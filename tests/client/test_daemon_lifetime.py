"""A device daemon leaves nothing behind: its children die with it, and a daemon that finds
its SuperNode's port taken (an orphan of an earlier one) says so and exits."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from client.node.daemon import EXIT_PORT_TAKEN, parse_config, run_daemon

ROOT = Path(__file__).resolve().parents[2]

PARENT = """
import os, sys, time
from pathlib import Path
from protocols.processes import ManagedProcess
child = ManagedProcess(
    "child", [sys.executable, "-c", "from protocols.processes import die_with_parent; "
              "die_with_parent(); import time; time.sleep(120)"],
    env=os.environ, log_path=Path(sys.argv[1]), die_with_parent=sys.argv[2] == "1")
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _child_of_a_killed_parent(tmp_path: Path, die_with_parent: bool) -> int:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "child.log"),
         "1" if die_with_parent else "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the child has called die_with_parent by now (it imports little)
    parent.kill()
    parent.wait()
    return child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_a_daemons_child_dies_when_the_daemon_is_killed(tmp_path: Path) -> None:
    child = _child_of_a_killed_parent(tmp_path, die_with_parent=True)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the SIGKILLed parent's child is still running"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_without_the_request_the_child_would_be_an_orphan(tmp_path: Path) -> None:
    """The control: what the daemon's children did before (issue 13: they kept training)."""
    child = _child_of_a_killed_parent(tmp_path, die_with_parent=False)
    try:
        time.sleep(1.0)
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_daemon_whose_port_is_taken_says_so_and_exits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as orphan:  # an earlier daemon's SuperNode, still listening
        orphan.bind(("127.0.0.1", 0))
        orphan.listen()
        port = orphan.getsockname()[1]
        (tmp_path / "notes.txt").write_text("a device's own text")
        config = parse_config({"superlink": {"address": "127.0.0.1:9093", "insecure": True},
                               "node": {"state_dir": "s", "runtime_port": port,
                                        "warm_clientapp": False},
                               "data": {"path": "notes.txt"}}, tmp_path)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="client.node.daemon"):
            assert run_daemon(config, threading.Event()) == EXIT_PORT_TAKEN
    assert time.monotonic() - started < 5, "it must not loop restarting the SuperNode"
    assert f"node.runtime_port {port} is already in use" in caplog.text
    assert not (tmp_path / "s" / "client.log").exists(), "no SuperNode was started"
