"""What a finished run did, from its ``metrics.jsonl``: the last thing a command prints.

A run whose rounds trained nothing — every sampled device failed, a secure-aggregation
round was abandoned, a simulation's workers were lost — still ends with an adapter, so
success cannot be read from the exit of the strategy loop. Both ``fedtune simulate`` and
``fedtune coordinator`` print this summary and exit with :data:`EXIT_DEGRADED` when a
round produced no update, and record it in the run folder's ``run_info.json``. A round whose
Poisson sample (client-level DP) drew no device at all is not a failure: it is counted apart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from protocols.atomic_write import write_json_atomic
from server.metrics_log import read_metrics
from server.run_dir import RUN_INFO, read_run_info

#: Exit status of a run that finished but in which some round trained nothing.
EXIT_DEGRADED = 3


@dataclass(frozen=True)
class RunSummary:
    """Rounds that produced an update and rounds that did not, with the failure counts."""

    trained: tuple[int, ...]
    idle: tuple[int, ...]  # rounds that ended without an update
    failed: int
    rejected: int
    abandoned: tuple[int, ...] = field(default=())  # SecAgg rounds below the threshold
    empty: tuple[int, ...] = field(default=())  # Poisson samples that drew no device

    @property
    def degraded(self) -> bool:
        return bool(self.idle)

    def line(self) -> str:
        total = len(self.trained) + len(self.idle) + len(self.empty)
        text = (f"{len(self.trained)} of {total} rounds trained; "
                f"{self.failed} client failures, {self.rejected} rejected updates")
        if self.idle:
            text += (f"; rounds {list(self.idle)} trained nothing"
                     + (f" (secure aggregation abandoned in {list(self.abandoned)})"
                        if self.abandoned else "")
                     + ": see metrics.jsonl and run.log")
        if self.empty:
            text += (f"; rounds {list(self.empty)} sampled no device (Poisson sampling "
                     "under client-level DP: the noise alone was released)")
        return text


def summarize(run_dir: Path) -> RunSummary:
    rows = [r for r in read_metrics(run_dir) if r.get("round", 0) > 0 and "clients" in r]
    return RunSummary(
        trained=tuple(r["round"] for r in rows if r["clients"] > 0),
        idle=tuple(r["round"] for r in rows if r["clients"] == 0 and r.get("sampled", 1) > 0),
        empty=tuple(r["round"] for r in rows if r["clients"] == 0 and r.get("sampled") == 0),
        failed=sum(int(r.get("failed", 0)) for r in rows),
        rejected=sum(int(r.get("rejected", 0)) for r in rows),
        abandoned=tuple(r["round"] for r in rows if r.get("abandoned")))


def record_outcome(run_dir: Path) -> RunSummary:
    """Summarize the finished run and note a degraded one in its ``run_info.json``."""
    summary = summarize(run_dir)
    if summary.degraded:
        info = read_run_info(run_dir)
        info["degraded"] = {"idle_rounds": list(summary.idle), "failed": summary.failed}
        write_json_atomic(run_dir / RUN_INFO, info, indent=2)
    return summary


def report_outcome(run_dir: Path, prog: str) -> int:
    """Print the run's summary line (and, if degraded, one line on stderr); return the
    command's exit status: 0, or :data:`EXIT_DEGRADED`."""
    summary = record_outcome(run_dir)
    print(f"rounds:     {summary.line()}")
    if summary.degraded:
        print(f"{prog}: degraded run (exit status {EXIT_DEGRADED}): {summary.line()}",
              file=sys.stderr)
        return EXIT_DEGRADED
    return 0
