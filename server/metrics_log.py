"""Per-round metrics as JSON lines: appended and flushed each round, so a crash loses
at most the round in flight and a progress display can follow the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocols.atomic_write import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Drop rows of rounds after ``last_round`` (a resumed run re-runs them), atomically."""
    rows = [r for r in read_metrics(run_dir) if r.get("round", 0) <= last_round]
    write_text_atomic(run_dir / METRICS_FILE,
                      "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
