"""Fixtures shared by the deployment and load-script tests."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.deploy.processes import ManagedProcess, descendants

#: A parent that starts one sleeping child, then sleeps itself.
_PARENT_WITH_CHILD = ("import subprocess, sys, time; "
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                      "time.sleep(60)")


@pytest.fixture
def process_tree(tmp_path: Path) -> Iterator[ManagedProcess]:
    """A real two-process tree (parent + child), returned once the child exists and stopped
    whatever the test does (``stop`` is safe to call twice)."""
    proc = ManagedProcess("tree", [sys.executable, "-c", _PARENT_WITH_CHILD],
                          env=dict(os.environ), log_path=tmp_path / "tree.log")
    try:
        deadline = time.monotonic() + 20
        while not descendants(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield proc
    finally:
        proc.stop(timeout=5)
