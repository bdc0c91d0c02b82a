"""The adapter spec: which tensors make up the adapter, their shapes, and the PEFT config.

The coordinator never loads the base model to aggregate: it only needs to know what a valid
adapter looks like. The spec is plain data (JSON-serialisable) so it can be written beside a
checkpoint and sent to devices.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Adapter tensors travel as float32: fp16 is a codec choice, not a storage choice.
ADAPTER_DTYPE = np.dtype(np.float32)

# Named adapter tensors (PEFT state-dict key -> float32 array): the one definition, imported
# everywhere. Two names because two meanings are in use:
#: What code builds and returns (decoded uploads, aggregates, perturbations): a plain dict
#: its owner may fill and update in place.
Tensors = dict[str, npt.NDArray[np.float32]]
#: What code that only reads accepts: a read-only ``Mapping``, so a caller may pass any
#: mapping (a ``Tensors`` dict, a ``MappingProxyType``...), and the callee cannot mutate it.
TensorsView = Mapping[str, npt.NDArray[np.float32]]


@dataclass(frozen=True)
class TensorSpec:
    """Shape and trainability of one adapter tensor."""

    shape: tuple[int, ...]
    trainable: bool = True

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ADAPTER_DTYPE.itemsize


@dataclass(frozen=True)
class AdapterSpec:
    """What a valid adapter is: tensor names in PEFT state-dict spelling, and how to save it.

    Parameters
    ----------
    tensors
        PEFT state-dict key (``base_model.model....lora_A.weight``) to its spec.
    peft_config
        The ``adapter_config.json`` content PEFT needs to load the adapter again.
    """

    tensors: Mapping[str, TensorSpec]
    peft_config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, npt.NDArray[Any]],
        peft_config: Mapping[str, Any],
        frozen: frozenset[str] = frozenset(),
    ) -> AdapterSpec:
        tensors = {
            k: TensorSpec(shape=tuple(int(d) for d in v.shape), trainable=k not in frozen)
            for k, v in arrays.items()
        }
        return cls(tensors=tensors, peft_config=dict(peft_config))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def trainable_keys(self) -> list[str]:
        return [k for k, t in self.tensors.items() if t.trainable]

    def to_json(self) -> str:
        return json.dumps(
            {
                "tensors": {
                    k: {"shape": list(t.shape), "trainable": t.trainable}
                    for k, t in self.tensors.items()
                },
                "peft_config": dict(self.peft_config),
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> AdapterSpec:
        raw = json.loads(text)
        tensors = {
            k: TensorSpec(shape=tuple(v["shape"]), trainable=bool(v["trainable"]))
            for k, v in raw["tensors"].items()
        }
        return cls(tensors=tensors, peft_config=raw["peft_config"])
