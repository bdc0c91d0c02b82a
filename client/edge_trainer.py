"""Forward-only LoRA training on ONNX Runtime (the "edge client"): MeZO steps, no backprop.

ONNX Runtime has no training packages after 1.19 (docs/architecture.md), so an edge device
estimates the gradient from two forward passes per step (MeZO, Malladi et al., NeurIPS 2023,
Alg. 1)::

    z = perturbation(seed)                      # ±1 over the trainable tensors
    g = (L(θ + εz) − L(θ − εz)) / (2ε)          # same batch for both passes
    θ ← θ − lr·g·z

Each step is fully described by ``(seed, g)``, so the device can upload 12 bytes a step
(codec ``seed-scalar``) and the coordinator replays them bit for bit
(:mod:`protocols.seed_updates`); or it can upload its final θ through the ordinary ``fp32``
codec. :meth:`EdgeMeZOTrainer.train` returns both; the round's codec decides which leaves.

Buffers (docs/architecture.md): θ is kept clean and θ ± εz is written into a *separate*
buffer. Adding and then subtracting εz in θ's own buffer does not return the same float32
bits, and the coordinator's replay, which never perturbs, would then diverge from the client.

This module must import without torch, transformers or peft (``pip install fedtune[edge]``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from client.local_data import LocalData, LocalDataError
from client.trainer import DeviceBlocks, EvalOutcome, TrainInstruction, TrainOutcome
from kernels.data.templates import PromptTemplate, TemplateChoice
from kernels.edge_runtime import EdgeModel
from protocols import keys
from protocols.adapter_spec import AdapterSpec, Tensors, TensorSpec, TensorsView
from protocols.run_config import LoraSection
from protocols.seed_updates import (
    SeedUpdate,
    apply_seed_updates,
    check_last_step,
    direction,
    layout_id,
    sgd_step,
    step_coefficient,
    trainable_shapes,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeZOSettings:
    """Knobs of the forward-only trainer that the coordinator's instruction does not carry."""

    epsilon: float = field(
        default=1e-3,
        metadata={"help": "perturbation scale ε of the two-point estimate (MeZO uses 1e-3)"},
    )
    max_abs_scalar: float = field(
        default=1e3,
        metadata={"help": "clip |g| to this; must not exceed the coordinator's bound, which "
                          "rejects larger scalars"},
    )

    check_blocks: int = field(
        default=0,
        metadata={"help": "held-out blocks of the device's own data on which it scores its "
                          "round's update at 1, 1/2, 1/4 and 0 of its length and sends the "
                          "best (its scalars scaled, so the replay stays exact); 0 = off"},
    )

    def __post_init__(self) -> None:
        if self.check_blocks < 0:
            raise ValueError(f"check_blocks must be >= 0, got {self.check_blocks}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be finite and > 0, got {self.epsilon}")
        if not (self.max_abs_scalar > 0 and math.isfinite(self.max_abs_scalar)):
            raise ValueError(f"max_abs_scalar must be finite and > 0, got {self.max_abs_scalar}")


@dataclass
class EdgeTrainOutcome(TrainOutcome):
    """A :class:`TrainOutcome` (``tensors`` = the final trainable θ, the dense upload) plus
    the same steps as ``(seed, g)`` pairs for the ``seed-scalar`` codec."""

    seed_update: SeedUpdate | None = None


class EdgeMeZOTrainer:
    """Trains the LoRA adapter of a frozen ONNX base with MeZO; implements ``Trainer``.

    Parameters
    ----------
    model
        The loaded export (:class:`kernels.edge_runtime.EdgeModel`), reused across rounds.
    lora
        The run's ``[lora]`` section: only its frozen/trainable split is used here
        (FFA-LoRA's A is never perturbed nor uploaded). It must match the coordinator's,
        or the seed update is refused (layout fingerprint).
    settings
        ε and the |g| clip.
    template
        The run's ``data.template``: chat and instruction examples are rendered with the
        export's chat template (or Alpaca) and only their answers are scored, as on torch.
    """

    def __init__(
        self, model: EdgeModel, lora: LoraSection, *, settings: MeZOSettings | None = None,
        template: TemplateChoice = "auto",
    ) -> None:
        if not model.float_activations:
            # Measured on SmolLM2 (kernels.edge_quantize): int8 activations make the loss
            # piecewise constant at ε, so every projected gradient would be noise.
            raise ValueError(
                f"edge export {model.export_dir} uses quantization {model.quantization!r}, which "
                "quantizes activations: MeZO cannot train on it (its ±εz finite differences "
                "come out as noise). Re-export with a float-activation option, e.g. "
                "`fedtune export-edge --quantization int4-gguf` (the default)")
        self.model = model
        self.lora = lora
        self.settings = settings or MeZOSettings()
        self.spec = AdapterSpec(tensors={
            k: TensorSpec(shape=s, trainable=not lora.is_frozen(k))
            for k, s in model.adapter_shapes.items()
        })
        if not self.spec.trainable_keys:
            raise ValueError("the export has no trainable adapter tensor for these [lora] "
                             "settings; nothing to train")
        self.shapes = trainable_shapes(self.spec)
        self.blocks = DeviceBlocks(model.tokenizer,
                                   PromptTemplate.for_tokenizer(model.export_dir, template),
                                   model.eos_token_id)

    @classmethod
    def from_export(
        cls,
        export_dir: Path,
        lora: LoraSection,
        *,
        threads: int = 1,
        public_key: Any = None,
        settings: MeZOSettings | None = None,
        template: TemplateChoice = "auto",
    ) -> EdgeMeZOTrainer:
        """Load (and verify, see :class:`EdgeModel`) an export folder, then wrap it."""
        return cls(EdgeModel(export_dir, threads=threads, public_key=public_key), lora,
                   settings=settings, template=template)

    def _start(self, adapter: Mapping[str, npt.NDArray[Any]]) -> Tensors:
        """A private float32 copy of the global adapter: the clean θ."""
        expected = set(self.spec.tensors)
        if set(adapter) != expected:
            missing, unexpected = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
            raise ValueError(f"adapter keys do not match the export: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return {k: np.array(adapter[k], dtype=np.float32, copy=True) for k in self.spec.tensors}

    def train(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        data: LocalData,
        instruction: TrainInstruction,
    ) -> EdgeTrainOutcome:
        start = time.perf_counter()
        blocks = self.blocks.get(data, "train", instruction.seq_len)
        theta0 = self._start(adapter)  # the round's global adapter, kept clean
        theta = {k: v.copy() for k, v in theta0.items()}
        probe = {k: v.copy() for k, v in theta.items()}  # θ ± εz lives here, never in θ
        order, seeds = _draws(len(blocks), instruction)
        eps = np.float32(self.settings.epsilon)
        bound = self.settings.max_abs_scalar
        subspace = instruction.subspace
        anchor = self._anchor(theta0, instruction)
        still = anchor is not None and not any(np.any(anchor[k]) for k in self.shapes)
        scalars = np.zeros(instruction.local_steps, dtype=np.float32)
        losses = []
        for step in range(instruction.local_steps):
            batch = blocks.take(
                order[step * instruction.batch_size:(step + 1) * instruction.batch_size])
            if still:  # a zero anchor spans nothing (LoRA's B before round 1, no last
                # step yet): g = 0, one pass
                losses.append(self.model.mean_loss(batch.ids, theta, scored=batch.scored))
                continue
            z = direction(int(seeds[step]), self.shapes, subspace=subspace, anchor=anchor)
            for key, along in z.items():
                np.add(theta[key], eps * along, out=probe[key])
            loss_plus = self.model.mean_loss(batch.ids, probe, scored=batch.scored)
            for key, along in z.items():
                np.subtract(theta[key], eps * along, out=probe[key])
            loss_minus = self.model.mean_loss(batch.ids, probe, scored=batch.scored)
            g = (loss_plus - loss_minus) / (2.0 * float(eps))
            if not math.isfinite(g):
                raise ValueError(
                    f"client {data.client_id}: non-finite loss at MeZO step {step} "
                    f"(L+={loss_plus}, L-={loss_minus}); lower the learning rate"
                )
            scalars[step] = np.float32(min(max(g, -bound), bound))
            sgd_step(theta, z, step_coefficient(instruction.learning_rate, scalars[step]))
            losses.append(0.5 * (loss_plus + loss_minus))
        if self.settings.check_blocks and not still:
            theta, scalars = self._checked(theta0, theta, seeds, scalars, data, instruction)
        update = SeedUpdate(base_round=instruction.server_round, seeds=seeds, scalars=scalars,
                            layout=layout_id(self.shapes, subspace))
        log.debug("client %s: %d MeZO steps, mean loss %.4f, |g| max %.3g", data.client_id,
                  instruction.local_steps, float(np.mean(losses)), float(np.abs(scalars).max()))
        return EdgeTrainOutcome(
            tensors={k: theta[k] for k in self.spec.trainable_keys},
            num_examples=len(blocks),
            metrics={
                keys.TRAIN_LOSS: float(np.mean(losses)),
                keys.TRAIN_SECONDS: time.perf_counter() - start,
            },
            seed_update=update,
        )

    def _anchor(self, theta0: Tensors, instruction: TrainInstruction) -> TensorsView | None:
        """What the round's directions are built from: the global adapter θ₀
        (``components``), the coordinator's last step (``trajectory``), nothing (``full``)."""
        if instruction.subspace == "components":
            return theta0
        if instruction.subspace != "trajectory":
            return None
        return check_last_step(instruction.last_step, self.shapes)

    def _checked(
        self, start: Tensors, theta: Tensors, seeds: npt.NDArray[np.uint64],
        scalars: npt.NDArray[np.float32], data: LocalData, instruction: TrainInstruction,
    ) -> tuple[Tensors, npt.NDArray[np.float32]]:
        """The round's update at the length (1, 1/2, 1/4 or 0 of it) that scores best on
        ``check_blocks`` of the device's own held-out blocks, and its scalars.

        Weighting an update by its measured held-out progress, done where the held-out
        data is: late in training a forward-only update is mostly noise, and a device that
        cannot show progress on its own held-out text sends less of it (nothing at 0).
        The factors are powers of two, so ``factor · g`` is exact and the coordinator's
        replay of the scaled scalars is the adapter scored here, bit for bit.
        """
        held = self.blocks.get(data, "heldout", instruction.seq_len)
        if len(held) == 0:
            return theta, scalars
        blocks = held.take(slice(0, self.settings.check_blocks))

        def loss(candidate: Mapping[str, npt.NDArray[np.float32]]) -> float:
            return self.model.mean_loss(blocks.ids, candidate, scored=blocks.scored)

        best = (loss(theta), 1.0, theta, scalars)
        for factor in (0.5, 0.25, 0.0):
            scaled = (np.float32(factor) * scalars).astype(np.float32)
            candidate = apply_seed_updates(
                start, list(zip(seeds.tolist(), scaled, strict=True)), spec=self.spec,
                learning_rate=instruction.learning_rate, subspace=instruction.subspace,
                last_step=instruction.last_step)
            scored = loss(candidate)
            if scored < best[0]:
                best = (scored, factor, candidate, scaled)
        log.debug("client %s: held-out check keeps %.2f of the update (loss %.4f)",
                  data.client_id, best[1], best[0])
        return best[2], best[3]

    def score_multiples(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        step: Mapping[str, npt.NDArray[Any]],
        multiples: Sequence[float],
        data: LocalData,
        *,
        seq_len: int,
        blocks: int,
        last_step: Mapping[str, npt.NDArray[Any]] | None = None,
        momenta: Sequence[float] = (0.0,),
    ) -> list[float]:
        """This device's mean loss at θ + η·step for each η of ``multiples`` (the
        coordinator's line search, ``edge.line_search``): forward passes only, on the first
        ``blocks`` of its own held-out blocks (its training blocks when it holds none).
        With ``last_step`` (``edge.line_search_momentum``): at θ + η·step + μ·last_step for
        every η and every μ of ``momenta``, η major (η₁μ₁, η₁μ₂, …).

        The same blocks score every candidate, so the losses differ only by the adapter."""
        theta = self._start(adapter)
        along = self._direction(step, "step")
        back = self._direction(last_step, "last step") if last_step is not None else None
        if back is None and list(momenta) != [0.0]:
            raise ValueError(f"momenta {list(momenta)} need the last step to scale")
        try:
            source = self.blocks.get(data, "heldout", seq_len)
        except LocalDataError:  # no held-out block: the training blocks (the step being
            source = self.blocks.get(data, "train", seq_len)  # scored is not only its own)
        batch = source.take(slice(0, blocks))
        losses = []
        for eta in multiples:
            for mu in momenta:
                candidate = dict(theta)
                for key, value in along.items():
                    moved = theta[key] + np.float32(eta) * value
                    if back is not None and mu:
                        moved = moved + np.float32(mu) * back[key]
                    candidate[key] = moved
                losses.append(self.model.mean_loss(batch.ids, candidate, scored=batch.scored))
        log.debug("client %s: line search over %s x %s: losses %s", data.client_id,
                  list(multiples), list(momenta), [round(x, 4) for x in losses])
        return losses

    def _direction(self, step: Mapping[str, npt.NDArray[Any]], what: str
                   ) -> dict[str, npt.NDArray[np.float32]]:
        """A direction of the line search: every trainable tensor, in its shape."""
        along = {}
        for key, shape in self.shapes.items():  # the trainable tensors; others stay put
            value = step.get(key)
            if value is None or tuple(value.shape) != shape:
                got = "nothing" if value is None else str(tuple(value.shape))
                raise ValueError(f"line-search {what} `{key}`: expected shape {shape}, got "
                                 f"{got} (do this device's [lora] settings differ from the "
                                 "coordinator's?)")
            along[key] = np.asarray(value, dtype=np.float32)
        return along

    def evaluate(
        self,
        adapter: Mapping[str, npt.NDArray[Any]],
        data: LocalData,
        *,
        seq_len: int,
        batch_size: int,
    ) -> EvalOutcome:
        """Token-weighted mean held-out next-token loss, as the torch trainer reports it."""
        theta = self._start(adapter)
        blocks = self.blocks.get(data, "heldout", seq_len)
        total, tokens = 0.0, 0
        for i in range(0, len(blocks), batch_size):
            batch = blocks.take(slice(i, i + batch_size))
            nll = self.model.token_nll(batch.ids, theta)  # (B, S-1)
            # The loss mask: nll[:, t] predicts token t + 1.
            mask = None if batch.every_token_scored else batch.scored[:, 1:]
            total += float(nll.sum(dtype=np.float64) if mask is None
                           else nll.sum(dtype=np.float64, where=mask))
            tokens += batch.scored_tokens
        return EvalOutcome(loss=total / tokens, tokens=tokens)


def _draws(
    n_blocks: int, instruction: TrainInstruction
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """Batch order (shuffled epochs) and distinct step seeds, from (seed, round).

    Seeded like the torch trainer's batch order, so a rerun of a round reproduces the same
    update. The seeds are public anyway (they are the upload); distinct because the
    coordinator refuses a repeated seed.
    """
    batches, directions = np.random.SeedSequence(
        [instruction.seed % (1 << 64), instruction.server_round]
    ).spawn(2)
    rng = np.random.default_rng(batches)
    needed = instruction.local_steps * instruction.batch_size
    epochs = -(-needed // n_blocks)
    order = np.concatenate([rng.permutation(n_blocks) for _ in range(epochs)])[:needed]
    seed_rng = np.random.default_rng(directions)
    seeds: list[int] = []
    while len(seeds) < instruction.local_steps:
        candidate = int(seed_rng.integers(0, 1 << 64, dtype=np.uint64))
        if candidate not in seeds:
            seeds.append(candidate)
    return order, np.array(seeds, dtype=np.uint64)
