"""A run's progress in the terminal, round by round, for ``simulate`` and ``coordinator``.

Both follow the run folder's ``metrics.jsonl`` (one line per round, flushed as it is
written) from a thread, so the same display serves a simulation and a deployment whose
ServerApp runs in another process. On a terminal it is a ``rich`` progress bar; anywhere
else (a file, CI, a service's journal) one plain line per round, with no ANSI codes:
``round 3/10: 2 clients, 0 failed, 0 rejected, perplexity 78.9, 31 s``.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from server.metrics_log import read_metrics


def describe_round(row: dict[str, Any], total: int) -> str:
    """One round's line: clients, failures, the score (central, else federated)."""
    if row.get("round", 0) == 0:
        parts = [f"round 0/{total} (before training)"]
    else:
        parts = [f"round {row['round']}/{total}: {row.get('clients', 0)} clients, "
                 f"{row.get('failed', 0)} failed, {row.get('rejected', 0)} rejected"]
        if row.get("retries"):
            parts.append(f"{row['retries']} retr{'y' if row['retries'] == 1 else 'ies'}")
    if "perplexity" in row:
        parts.append(f"perplexity {row['perplexity']:.1f}")
    elif "fed_eval_loss_weighted" in row:
        parts.append(f"device perplexity {math.exp(row['fed_eval_loss_weighted']):.1f} "
                     f"(token-weighted, {row.get('fed_eval_devices', 0)} devices)")
    if "epsilon" in row:
        parts.append(f"epsilon {row['epsilon']:.3g}")
    if "round_s" in row:
        parts.append(f"{row['round_s']:.0f} s")
    return ", ".join(parts)


def follow_metrics(run_dir_box: list[Path], total: int, stop: threading.Event,
                   update: Callable[[dict[str, Any]], None], seen: list[int] | None = None
                   ) -> None:
    """Poll ``metrics.jsonl`` of the run in progress (once its folder is in the box) and
    report each new row, until ``total`` rows were seen or ``stop`` is set; ``seen[0]``
    counts the rows reported (for a last look after the run)."""
    seen = seen if seen is not None else [0]
    while not stop.is_set():
        _report_new(run_dir_box, update, seen)
        if seen[0] >= total:
            return
        stop.wait(1.0)


def _report_new(run_dir_box: list[Path], update: Callable[[dict[str, Any]], None],
                seen: list[int]) -> None:
    if not run_dir_box:
        return
    folder = run_dir_box[0]
    finished = folder.with_name(folder.name.removesuffix(".partial"))
    try:  # the run folder loses ".partial" when it finishes; a line may be half written
        rows = read_metrics(folder if folder.is_dir() else finished)
    except (OSError, ValueError):
        return
    for row in rows[seen[0]:]:
        update(row)
    seen[0] = max(seen[0], len(rows))


@contextmanager
def round_progress(label: str, rounds: int, *, enabled: bool = True,
                   stream: TextIO | None = None) -> Iterator[list[Path]]:
    """Show the rounds of the run whose folder is put into the yielded list (``on_start``
    of the runners does that). Rows already in a resumed run's file are shown at once."""
    stream = stream or sys.stderr
    box: list[Path] = []
    if not enabled:
        yield box
        return
    stop = threading.Event()
    progress: Any = None
    if stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} rounds"),
                            TimeElapsedColumn(), console=Console(file=stream),
                            transient=False)
        task = progress.add_task(f"{label}: starting", total=rounds)

        def update(row: dict[str, Any]) -> None:
            progress.update(task, completed=row["round"],
                            description=f"{label}: {describe_round(row, rounds)}")
    else:
        def update(row: dict[str, Any]) -> None:
            print(f"{label}: {describe_round(row, rounds)}", file=stream, flush=True)

    seen = [0]
    follower = threading.Thread(target=follow_metrics,
                                args=(box, rounds + 1, stop, update, seen),
                                daemon=True, name="round-progress")
    if progress is not None:
        progress.start()
    follower.start()
    try:
        yield box
    finally:
        stop.set()
        follower.join(timeout=2)
        if not follower.is_alive():
            _report_new(box, update, seen)  # rows written after the last poll
        if progress is not None:
            progress.stop()
