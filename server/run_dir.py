"""Run folders: created only after every check passed, and named so a failed run never
looks like a finished one (``<name>.partial`` while running, ``<name>`` when done,
``<name>.failed`` if it broke)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from protocols.atomic_write import write_json_atomic
from protocols.config_file import to_toml
from protocols.run_config import RunConfig

RUN_INFO = "run_info.json"


def comparable_fingerprint(config: RunConfig) -> str:
    """What must match for two runs to be compared side by side: model, data, adapter and
    the training budget. Federation settings (codec, threads) may differ."""
    import hashlib

    nested = config.to_nested()
    keep = {k: nested[k] for k in ("model", "data", "lora", "train")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def new_run_dir(
    runs_dir: Path, kind: str, config: RunConfig, name: str | None = None
) -> Iterator[Path]:
    name = name or time.strftime(f"%Y%m%d-%H%M%S-{kind}")
    final = runs_dir / name
    if final.exists():
        raise FileExistsError(f"run folder {final} already exists; pick another --name")
    work = runs_dir / f"{name}.partial"
    for left in (work, final.with_name(f"{name}.failed")):
        if left.exists():  # an interrupted run: never overwrite what it kept
            raise FileExistsError(
                f"an interrupted run named {name!r} is in {left}; resume it (`fedtune "
                f"simulate --resume {name}`, or `fedtune coordinator --resume {name}` for a "
                "deployed run), move it away, or pick another --name")
    work.mkdir(parents=True, exist_ok=False)
    (work / "config.toml").write_text(to_toml(config))
    info: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "fingerprint": comparable_fingerprint(config),
        "edge_fraction": config.edge.fraction,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(work / RUN_INFO, info, indent=2)
    with _finish_or_fail(work, final, info):
        yield work


class ResumeError(ValueError):
    """The named run cannot be resumed; the message says why and what to do."""


def unfinished_run_dir(runs_dir: Path, name: str) -> Path:
    """The folder of an interrupted run: ``<name>.partial`` (killed) or ``<name>.failed``."""
    if (runs_dir / name).exists():
        raise ResumeError(f"run {name!r} already finished ({runs_dir / name}); nothing to "
                          "resume")
    for suffix in (".partial", ".failed"):
        candidate = runs_dir / f"{name}{suffix}"
        if (candidate / RUN_INFO).is_file() and (candidate / "config.toml").is_file():
            return candidate
    raise ResumeError(f"no interrupted run {name!r} in {runs_dir} (looked for {name}.partial "
                      f"and {name}.failed with config.toml); check --runs-dir and the name")


@contextmanager
def reopened_run_dir(runs_dir: Path, name: str) -> Iterator[Path]:
    """Continue an interrupted run in its own folder (renamed back to ``.partial``): the
    coordinator finds its checkpoint and ledger there (``server/checkpoint.py``)."""
    found = unfinished_run_dir(runs_dir, name)
    work = runs_dir / f"{name}.partial"
    if found != work:
        os.replace(found, work)
    info = read_run_info(work)
    info.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S"))
    info.pop("finished", None)
    write_json_atomic(work / RUN_INFO, info, indent=2)
    with _finish_or_fail(work, runs_dir / name, info):
        yield work


@contextmanager
def _finish_or_fail(work: Path, final: Path, info: dict[str, Any]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        _mark_failed(work, final.with_name(f"{final.name}.failed"))
        raise  # the run's own error, whatever happened to the folder
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(work / RUN_INFO, info, indent=2)
    os.replace(work, final)


def _mark_failed(work: Path, failed: Path) -> None:
    """Rename ``work`` to ``failed``; an older ``failed`` folder of the same name (a run that
    broke, was resumed and broke again) is kept under a timestamped name first. A rename
    that cannot happen leaves ``work`` as it is and is logged, never raised: the run's own
    error is what the user must see."""
    import logging

    try:
        if failed.exists():
            os.replace(failed, failed.with_name(
                f"{failed.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
        os.replace(work, failed)
    except OSError as err:
        logging.getLogger(__name__).error("could not mark %s as failed (%s); it stays there",
                                          work, err)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy fedtune's and Flower's log records into the run folder while the run lasts."""
    import logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flower = logging.getLogger("flwr")
    # Flower's logger writes through its own handler; where it also propagates to the root
    # logger (Flower's own launcher, `flwr run`), the root handler alone sees each record.
    loggers = [logging.getLogger()] + ([] if flower.propagate else [flower])
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def read_run_info(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RUN_INFO).read_text())  # type: ignore[no-any-return]


def latest_comparable(
    runs_dir: Path, kind: str, fingerprint: str, *, edge_fraction: float | None = None
) -> Path | None:
    """The newest finished run of ``kind`` with the same fingerprint (and, if given, the
    same share of edge clients), if any."""
    found = []
    for info_file in runs_dir.glob(f"*/{RUN_INFO}"):
        run = info_file.parent
        if run.suffix in (".partial", ".failed"):
            continue
        info = read_run_info(run)
        if info.get("kind") != kind or info.get("fingerprint") != fingerprint:
            continue
        if edge_fraction is not None and info.get("edge_fraction", 0.0) != edge_fraction:
            continue
        found.append((info.get("finished", ""), run))
    return max(found)[1] if found else None
