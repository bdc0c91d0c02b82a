"""The trainer seam: a device turns (global adapter, local data) into an adapter update.

Two trainers implement it, the torch/PEFT backprop trainer (:mod:`client.torch_trainer`)
and the ONNX Runtime forward-only trainer of edge clients (:mod:`client.edge_trainer`), so
the ClientApp does not care which kind of device it runs on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy.typing as npt

from client.local_data import LocalData, LocalDataError
from kernels.data.blocks import Blocks, encode_blocks
from kernels.data.templates import PromptTemplate
from protocols.adapter_spec import Tensors, TensorsView
from protocols.seed_updates import SUBSPACES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInstruction:
    """What the coordinator asked for this round (from the message's ConfigRecord)."""

    server_round: int
    local_steps: int
    batch_size: int
    learning_rate: float
    seq_len: int
    seed: int
    #: Where a forward-only trainer's steps move (``edge.subspace``; torch trainers ignore it).
    subspace: str = "full"
    #: The coordinator's last step of the global adapter: the ``trajectory`` subspace's one
    #: direction (sent with the instruction; None for every other subspace).
    last_step: TensorsView | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("local_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.subspace not in SUBSPACES:
            raise ValueError(f"subspace must be one of {list(SUBSPACES)}, got {self.subspace!r}")
        if (self.subspace == "trajectory") != (self.last_step is not None):
            raise ValueError("the 'trajectory' subspace, and only it, comes with the "
                             "coordinator's last step of the global adapter; got subspace "
                             f"{self.subspace!r} with{'' if self.last_step is not None else 'out'}"
                             " a last step")


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
        data: LocalData,
        instruction: TrainInstruction,
    ) -> TrainOutcome: ...

    def evaluate(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        data: LocalData,
        *,
        seq_len: int,
        batch_size: int,
    ) -> EvalOutcome: ...


class DeviceBlocks:
    """A device's token blocks per (client, split, length), cut once per process.

    Both trainers cut blocks here (:func:`kernels.data.blocks.encode_blocks`) with their
    tokenizer (a ``tokenizers.Tokenizer``) and the run's prompt template, so a torch and an
    edge device train on the same tokens and the same scored positions.
    """

    def __init__(self, tokenizer: Any, template: PromptTemplate, eos_token_id: int | None
                 ) -> None:
        self.tokenizer, self.template, self.eos_token_id = tokenizer, template, eos_token_id
        self._cache: dict[tuple[str, str, str, int], Blocks] = {}

    def get(self, data: LocalData, split: Literal["train", "heldout"], seq_len: int) -> Blocks:
        """The blocks of ``data``'s ``split``; raises :class:`LocalDataError` naming the data
        when it has too little for one block."""
        key = (data.client_id, data.source, split, seq_len)
        if key not in self._cache:
            examples = data.train if split == "train" else data.heldout
            blocks = encode_blocks(self.tokenizer, examples, self.template, seq_len,
                                   eos_token_id=self.eos_token_id)
            if blocks.truncated or blocks.dropped:
                log.info("%s (%s): %d example(s) cut to %d tokens, %d left out (their "
                         "answer starts after token %d)", data.where, split, blocks.truncated,
                         seq_len, blocks.dropped, seq_len)
            if len(blocks) == 0:
                raise LocalDataError(
                    f"{data.where}: the {split} part ({len(examples)} example(s)) makes no "
                    f"block of {seq_len} tokens with a scored token; add data, or lower "
                    "train.seq_len (chat examples longer than a block keep their first "
                    f"{seq_len} tokens)")
            self._cache[key] = blocks
        return self._cache[key]
