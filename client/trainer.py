"""The trainer seam: a device turns (global adapter, local data) into an adapter update.

Two trainers implement it, the torch/PEFT backprop trainer (:mod:`client.torch_trainer`)
and the ONNX Runtime forward-only trainer of edge clients (:mod:`client.edge_trainer`), so
the ClientApp does not care which kind of device it runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy.typing as npt

from client.local_data import LocalTextData
from protocols.adapter_spec import Tensors


@dataclass(frozen=True)
class TrainInstruction:
    """What the coordinator asked for this round (from the message's ConfigRecord)."""

    server_round: int
    local_steps: int
    batch_size: int
    learning_rate: float
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        for name in ("local_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class TrainOutcome:
    """The update and the numbers that may leave the device (nothing else does)."""

    tensors: Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalOutcome:
    loss: float
    tokens: int


class Trainer(Protocol):
    """Anything that can train and evaluate an adapter on local data."""

    def train(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        data: LocalTextData,
        instruction: TrainInstruction,
    ) -> TrainOutcome: ...

    def evaluate(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        data: LocalTextData,
        *,
        seq_len: int,
        batch_size: int,
    ) -> EvalOutcome: ...
