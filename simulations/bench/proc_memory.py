"""Memory of process trees from Linux ``/proc``: RSS sums sampled in a thread, PSS on demand.

Deployment processes spawn processes (SuperNode -> SuperExec -> ClientApp per message,
SuperLink -> SuperExec -> ServerApp), so what a party costs is the sum over its tree, and
trees must be found from one ``/proc`` scan per sample to stay cheap at 100+ processes.
RSS counts shared pages once per process (copy-on-write children of a fork server, shared
libraries), so RSS sums are upper bounds; PSS (``smaps_rollup``) splits shared pages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PSS_EVERY = 10  # PSS (~10 ms per large process) is read every this many samples
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ProcInfo:
    """The fields of ``/proc/PID/stat`` this script uses."""

    pid: int
    comm: str
    ppid: int
    pgrp: int
    start: int  # clock ticks after boot: tells a reused PID from the original
    rss: int  # bytes


def parse_stat(text: str) -> ProcInfo | None:
    """One ``/proc/PID/stat`` line; ``None`` for a zombie (its memory is already freed)."""
    pid, _, rest = text.partition(" (")
    comm, _, tail = rest.rpartition(") ")  # comm may hold spaces and parentheses
    fields = tail.split()
    if fields[0] == "Z":
        return None
    return ProcInfo(int(pid), comm, int(fields[1]), int(fields[2]), int(fields[19]),
                    int(fields[21]) * _PAGE)


def proc_table() -> dict[int, ProcInfo]:
    """Every live process, from one pass over ``/proc`` (one small read each)."""
    table: dict[int, ProcInfo] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    info = parse_stat(handle.read())
            except (OSError, IndexError, ValueError):
                continue  # exited between listing and reading
            if info is not None:
                table[info.pid] = info
    return table


def tree(root: int, table: Mapping[int, ProcInfo]) -> list[int]:
    """``root`` and its descendants in ``table``, plus members of the process group it
    leads (orphans keep the group id): the rule of
    :func:`protocols.processes.descendants`, without rescanning ``/proc``."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    stack = [root, *(p for p, i in table.items() if i.pgrp == root and p != root)]
    found = dict.fromkeys(p for p in stack if p in table)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = None
                stack.append(child)
    return list(found)


def pss(pids: Sequence[int]) -> int:
    """Proportional set size of ``pids`` in bytes (shared pages split between sharers)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
            total += int(match.group(1)) * 1024 if match else 0
    return total


@dataclass
class Sample:
    t: float
    rss: dict[str, int]  # tree label -> RSS bytes
    by_comm: dict[str, dict[str, int]]  # detailed trees: process name -> RSS bytes
    pss: dict[str, int] = field(default_factory=dict)  # detailed trees, every PSS_EVERY


class MemorySampler(threading.Thread):
    """Samples the RSS of every registered tree every ``interval`` s until :meth:`halt`.

    ``roots`` (label -> PID) may grow while it runs: devices start one after another.
    The trees in ``detailed`` also get RSS per process name and, every :data:`PSS_EVERY`
    samples, their PSS. Every PID seen in a tree is remembered with its start time for the
    final check.
    """

    def __init__(self, interval: float, *, detailed: Sequence[str] = ()) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.interval = interval
        self.detailed = tuple(detailed)
        self.roots: dict[str, int] = {}
        self.samples: list[Sample] = []
        self.seen: dict[int, tuple[int, str]] = {}
        self._halt = threading.Event()

    def sample(self) -> Sample:
        table = proc_table()
        out = Sample(time.monotonic(), {}, {})
        for label, root in list(self.roots.items()):
            pids = tree(root, table)
            out.rss[label] = sum(table[p].rss for p in pids)
            for pid in pids:
                self.seen.setdefault(pid, (table[pid].start, table[pid].comm))
            if label in self.detailed:
                names = out.by_comm.setdefault(label, {})
                for pid in pids:
                    names[table[pid].comm] = names.get(table[pid].comm, 0) + table[pid].rss
                if len(self.samples) % PSS_EVERY == 0:
                    out.pss[label] = pss(pids)
        return out

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.samples.append(self.sample())
            except Exception:  # a sampling hiccup must not end the measurement
                log.exception("memory sample failed")

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def alive_seen(seen: Mapping[int, tuple[int, str]]) -> list[int]:
    """PIDs from ``seen`` still running as the same process (same start time)."""
    table = proc_table()
    return [pid for pid, (start, _) in seen.items()
            if pid in table and table[pid].start == start]
