"""Fixtures shared by the deployment and load-script tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols.processes import ManagedProcess, wait_for

#: A parent that starts one child, which says so in a file once its interpreter is up (its
#: memory no longer grows) and sleeps; then the parent sleeps too.
_PARENT_WITH_CHILD = ("import subprocess, sys, time; "
                      "subprocess.Popen([sys.executable, '-c', 'import pathlib, sys, time; "
                      "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)', sys.argv[1]]); "
                      "time.sleep(60)")


@pytest.fixture
def process_tree(tmp_path: Path) -> Iterator[ManagedProcess]:
    """A real two-process tree (parent + child), returned once the child exists and stopped
    whatever the test does (``stop`` is safe to call twice)."""
    ready = tmp_path / "child-ready"
    proc = ManagedProcess("tree", [sys.executable, "-c", _PARENT_WITH_CHILD, str(ready)],
                          env=dict(os.environ), log_path=tmp_path / "tree.log")
    try:
        wait_for(ready.exists, timeout=30, what="the child to start", process=proc,
                 interval=0.05)
        yield proc
    finally:
        proc.stop(timeout=5)
