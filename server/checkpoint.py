"""The coordinator's checkpoint, and resuming a run from it without losing or repeating a round.

After every completed round the coordinator writes ``checkpoint.safetensors`` in the run
folder: the global adapter with the round number in the file's metadata, written to a
temporary file, fsynced and renamed (:func:`protocols.atomic_write.write_bytes_atomic`), so
a crash leaves either the previous checkpoint or the new one, never half of one. The privacy
ledger is persisted separately, as soon as a round's noisy aggregate exists
(``server/client_dp.py``) — before the checkpoint — so a crash between the two never
under-counts ε.

On restart (:func:`resume_point`) the run continues from the checkpointed adapter; a round
whose aggregate was computed (and its ε spent) but not checkpointed is re-run under a *new*
round number, so the ledger, which refuses to record a round twice, never double-counts and
never forgets. Flower's strategy loop always counts from 1; :class:`OffsetRounds` shifts the
numbers its inner strategy and our callbacks see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocols.adapter_spec import Tensors, TensorsView
from protocols.atomic_write import write_bytes_atomic

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "fedtune-checkpoint/1"


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    round: int  # the last completed round's number
    completed: int  # rounds completed so far (fewer than ``round`` if a round was lost)
    adapter: Tensors


def save_checkpoint(run_dir: Path, server_round: int, completed: int,
                    adapter: TensorsView) -> Path:
    from safetensors.numpy import save

    path = run_dir / CHECKPOINT_NAME
    data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.items()},
                metadata={"format": FORMAT, "round": str(server_round),
                          "completed": str(completed)})
    write_bytes_atomic(path, data)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last completed round's adapter, or ``None`` if the run has no checkpoint yet."""
    from safetensors import safe_open

    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            adapter = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types on a corrupt file
        raise CheckpointError(f"{path} is unreadable ({exc}); restore it from a backup or "
                              "start a new run") from None
    if meta.get("format") != FORMAT or not all(
        meta.get(k, "").isdigit() for k in ("round", "completed")
    ):
        raise CheckpointError(f"{path} is not a {FORMAT} file; start a new run folder")
    return Checkpoint(round=int(meta["round"]), completed=int(meta["completed"]),
                      adapter=adapter)


@dataclass(frozen=True)
class ResumePoint:
    """Where a (re)started run begins: rounds already done, the next round's number."""

    done: int
    last_round: int
    first_round: int
    adapter: Tensors | None


def resume_point(run_dir: Path, last_spent_round: int = 0) -> ResumePoint:
    """``last_spent_round``: the highest round in the privacy ledger (0 without DP)."""
    ckpt = load_checkpoint(run_dir)
    last = ckpt.round if ckpt else 0
    return ResumePoint(done=ckpt.completed if ckpt else 0, last_round=last,
                       first_round=max(last, last_spent_round) + 1,
                       adapter=ckpt.adapter if ckpt else None)


class OffsetRounds(Strategy):
    """Runs ``strategy`` with every round number shifted by ``offset`` (resumed runs).

    ``on_round(server_round)`` is called with the run's own round number before each round
    is configured (the device sampler reseeds there, so a resumed round samples as the
    uninterrupted run did)."""

    def __init__(self, strategy: Strategy, offset: int,
                 on_round: Callable[[int], None] | None = None) -> None:
        self.strategy = strategy
        self.offset = offset
        self.on_round = on_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.on_round is not None:
            self.on_round(server_round + self.offset)
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def shift(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None], *,
        skip_initial: bool = False,
    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """The evaluate callback with the same shift; round 0 (the starting adapter) keeps
        its number when nothing ran before, and is skipped on a resume or when
        ``skip_initial`` (already logged: a run stopped before its first checkpoint)."""
        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and (self.offset or skip_initial):
                return None
            return evaluate_fn(server_round + self.offset if server_round else 0, arrays)
        return shifted
