"""The observed update: what the coordinator sees of one target client, made by our client code.

The updates come from :class:`client.torch_trainer.TorchLoraTrainer` itself (PEFT LoRA,
AdamW, the client's own batching), the clipping from :func:`protocols.validation.clip_update` and
the sum from the secure-aggregation primitives of :mod:`protocols.secagg` (fixed-point
encoding, ChaCha20 pairwise and self masks, unmasking). Nothing about training is
re-implemented here, so the audit measures what fedtune really sends.

Views (the honest-but-curious coordinator of docs/architecture.md; it knows the public base
model, the global adapter and the training hyper-parameters):

* safeguards **off**: one client's raw update, ``uploaded - global`` (plain LoRA by default,
  or FFA-LoRA: A frozen, B only);
* safeguards **on** (fedtune's privacy preset): FFA-LoRA; every client of a cohort of ``m``
  clips its update to L2 norm ``C`` and adds its share ``N(0, (sigma*C)^2/m)`` of distributed
  Gaussian noise, so the aggregate carries ``N(0, (sigma*C)^2)`` as in DP-FedAvg (McMahan et
  al., ICLR 2018); secure aggregation (Bonawitz et al., CCS 2017) then shows the coordinator
  only the sum over the cohort. This is the arithmetic of ``client.secagg_client.mask_update``
  (clip, noise, fixed-point encode, mask), run here without the key-agreement messages.
  fedtune's coordinator sizes each share for its Shamir threshold ``t <= m``
  (``sigma*C/sqrt(t)``), i.e. more noise than here: the audit is on the safe side.
  ``noise_at="coordinator"`` is an ablation: the clients add no noise and the coordinator
  sees the noise-free secure sum of clipped updates, as it would if it added the noise itself
  after unmasking; it shows what the noise, not the sum, contributes.

The target device holds exactly ``batch_size`` blocks of ``seq_len`` tokens, so each of its
``local_steps`` AdamW steps sees the same ``B`` sequences (``local_steps`` epochs over its
data): the ground truth the attacks are scored against is well defined for 1 and 5 steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from client.local_data import LocalData
from client.trainer import TrainInstruction
from kernels.data.examples import Example
from protocols.adapter_spec import Tensors
from protocols.run_config import LoraSection

NOISE_PLACEMENTS = ("clients", "coordinator")
#: Fixed-point modulus for the secure sum: 64 bits leaves room for a fine scale.
_MODULUS_BITS = 64


class AuditError(ValueError):
    """The audit cannot run as asked (not enough text, cohort too small); the message says
    what to change."""


@dataclass(frozen=True, kw_only=True)
class Safeguards:
    """fedtune's privacy preset as the audit applies it (set these to the preset's values)."""

    cohort: int = field(default=10, metadata={"help": "m: clients summed by secure aggregation"})
    clip_norm: float = field(default=1.0, metadata={"help": "C: L2 bound of one client update"})
    noise_multiplier: float = field(
        default=1.0, metadata={"help": "sigma: the aggregate's noise std is sigma*C"})
    noise_at: str = field(
        default="clients",
        metadata={"help": "'clients' (distributed noise, m shares) or 'coordinator' (the "
                          "coordinator sees the noise-free sum and adds noise itself)"})

    def __post_init__(self) -> None:
        if self.cohort < 1:
            raise ValueError(f"cohort must be >= 1, got {self.cohort}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_at not in NOISE_PLACEMENTS:
            raise ValueError(f"noise_at must be one of {NOISE_PLACEMENTS}, got {self.noise_at!r}")


@dataclass(frozen=True)
class Observation:
    """One attack target: the coordinator's view and knowledge, plus the ground truth."""

    update: Tensors  # what the coordinator sees: one raw update, or the cohort's secure sum
    global_adapter: Tensors  # the round's global adapter (the coordinator's own)
    model: Any  # the public base + LoRA layout (a PeftModel), for the attacker's gradients
    instruction: TrainInstruction  # the round's hyper-parameters, known to the coordinator
    truth: npt.NDArray[np.int64]  # (B, S) the target's token blocks: scoring only
    protected: bool
    cohort: int
    target_norm: float  # L2 norm of the target's update before clipping


def exact_blocks(tokenizer: Any, speeches: Sequence[str], *, batch_size: int,
                 seq_len: int, client_id: str) -> tuple[str, ...]:
    """Whole speeches whose packed tokens make exactly ``batch_size`` blocks.

    Mirrors :func:`kernels.causal_lm_data.token_blocks` (each text tokenised alone, then an
    EOS; the short tail is dropped), so the trainer turns these texts into exactly ``B``
    blocks and every local step trains on all of them.
    """
    extra = 0 if tokenizer.eos_token_id is None else 1
    chosen: list[str] = []
    total = 0
    for text in speeches:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + extra
        if (total + n) // seq_len <= batch_size:
            chosen.append(text)
            total += n
        if total // seq_len == batch_size:
            return tuple(chosen)
    raise AuditError(
        f"client {client_id}: its {len(speeches)} speeches do not make {batch_size} blocks "
        f"of {seq_len} tokens; pick a client with more text or a smaller batch"
    )


class Scenario:
    """Trains target and cohort with the real client code and builds the coordinator's view.

    One :class:`TorchLoraTrainer` per adapter layout (plain LoRA for the unprotected view,
    FFA-LoRA for the protected one), built lazily and reused: the trainer resets the adapter
    from the global copy on every call, so clients do not leak into each other.
    """

    def __init__(self, model_dir: Path, *, lora: LoraSection, learning_rate: float,
                 seq_len: int, safeguards: Safeguards, off_freeze_a: bool = False,
                 threads: int = 1) -> None:
        self.model_dir = model_dir
        self.learning_rate = learning_rate
        self.seq_len = seq_len
        self.safeguards = safeguards
        self.threads = threads
        self._layouts = {False: replace(lora, freeze_a=off_freeze_a),
                         True: replace(lora, freeze_a=True)}
        self._trainers: dict[bool, tuple[Any, Tensors]] = {}
        self._updates: dict[tuple[int, str, TrainInstruction], Tensors] = {}

    def trainer(self, protected: bool) -> tuple[Any, Tensors]:
        """The trainer for a view and the round's global adapter (a fresh LoRA init)."""
        from client.torch_trainer import TorchLoraTrainer
        from kernels.lora import get_adapter

        layout = self._layouts[protected]
        same = [built for built in self._trainers.values() if built[0].lora == layout]
        if same:  # same layout for both views: share one model
            self._trainers[protected] = same[0]
        if protected not in self._trainers:
            trainer = TorchLoraTrainer(self.model_dir, layout, threads=self.threads)
            self._trainers[protected] = (trainer, get_adapter(trainer.model))
        return self._trainers[protected]

    def client_data(self, data: LocalData, batch_size: int, tokenizer: Any) -> LocalData:
        """The device's training set for one cell: exactly ``batch_size`` blocks."""
        texts = exact_blocks(tokenizer, data.train_texts, batch_size=batch_size,
                             seq_len=self.seq_len, client_id=data.client_id)
        # A fresh id per batch size: the trainer caches token blocks by client id.
        return LocalData(f"{data.client_id}#audit-b{batch_size}",
                         tuple(Example(text=t) for t in texts), ())

    def observe(self, target: LocalData, others: Sequence[LocalData], *,
                batch_size: int, local_steps: int, protected: bool, seed: int) -> Observation:
        """Train and return the coordinator's view of ``target`` in one grid cell."""
        from kernels.causal_lm_data import token_blocks
        from protocols.validation import clip_update

        trainer, start = self.trainer(protected)
        instruction = TrainInstruction(server_round=1, local_steps=local_steps,
                                       batch_size=batch_size, learning_rate=self.learning_rate,
                                       seq_len=self.seq_len, seed=seed)
        cohort = [target, *others] if protected else [target]
        if protected and len(cohort) < self.safeguards.cohort:
            raise AuditError(f"the protected view needs {self.safeguards.cohort} clients, "
                             f"got {len(cohort)}")
        updates = [self._update(trainer, start, data, instruction)
                   for data in cohort[: self.safeguards.cohort if protected else 1]]
        own = self.client_data(target, batch_size, trainer.tokenizer)
        truth = token_blocks(trainer.tokenizer, own.train_texts, self.seq_len)  # (B, S)
        norm = _norm(updates[0])
        if protected:
            rng = np.random.default_rng([seed, 104729])  # the clients' noise: not the attacker's
            guarded = [self._protect(clip_update(u, self.safeguards.clip_norm)[0], rng)
                       for u in updates]
            view = secure_sum(guarded, bound=self._fixed_point_bound())
        else:
            view = updates[0]
        return Observation(update=view, global_adapter=start, model=trainer.model,
                           instruction=instruction, truth=truth, protected=protected,
                           cohort=len(updates), target_norm=norm)

    def _update(self, trainer: Any, start: Tensors, data: LocalData,
                instruction: TrainInstruction) -> Tensors:
        """One client's raw update, memoised: with FFA-LoRA in both views the target's
        unprotected update is also its contribution to the protected sum."""
        key = (id(trainer), data.client_id, instruction)
        if any(k[2] != instruction for k in self._updates):
            self._updates.clear()  # a new cell: earlier updates are never asked for again
        if key not in self._updates:
            local = self.client_data(data, instruction.batch_size, trainer.tokenizer)
            outcome = trainer.train(start, local, instruction)
            if outcome.num_examples != instruction.batch_size:  # the truth would be wrong
                raise RuntimeError(f"client {data.client_id} trained on "
                                   f"{outcome.num_examples} blocks, expected "
                                   f"{instruction.batch_size}")
            self._updates[key] = {k: v - start[k] for k, v in outcome.tensors.items()}
        return self._updates[key]

    def _noise_share_std(self) -> float:
        s = self.safeguards
        if s.noise_at == "coordinator":
            return 0.0
        return s.noise_multiplier * s.clip_norm / math.sqrt(s.cohort)

    def _protect(self, clipped: Tensors, rng: np.random.Generator) -> Tensors:
        std = self._noise_share_std()
        if std == 0.0:
            return clipped
        return {k: (v + rng.normal(0.0, std, v.shape)).astype(np.float32)
                for k, v in clipped.items()}

    def _fixed_point_bound(self) -> float:
        # As server.secagg: a clipped coordinate is within +-C, a noise share beyond 6 std is
        # clipped by the encoder (never wrapped around).
        return self.safeguards.clip_norm + 6.0 * self._noise_share_std()


def secure_sum(updates: Sequence[Tensors], *, bound: float) -> Tensors:
    """The sum of ``updates`` as secure aggregation reveals it, and nothing else.

    Each client fixed-point encodes its flattened update, adds its self mask and the
    pairwise masks shared with every other client (fresh 32-byte seeds); the coordinator
    sums the uploads and removes the self masks; pairwise masks cancel.
    """
    from protocols.secagg import (
        decode_sum,
        encode,
        masked_input,
        new_seed,
        remove_masks,
        sum_masked,
    )
    from protocols.secagg.wire import fixed_point_scale

    if not updates:
        raise ValueError("secure_sum needs at least one update")
    keys = sorted(updates[0])
    n = len(updates)
    scale = fixed_point_scale(num_clients=n, clip_range=bound, modulus_bits=_MODULUS_BITS)
    common = {"scale": scale, "clip": bound, "modulus_bits": _MODULUS_BITS, "num_clients": n}
    pair_seeds = {(i, j): new_seed() for i in range(n) for j in range(i + 1, n)}
    self_seeds = {i: new_seed() for i in range(n)}
    uploads = {}
    for i, update in enumerate(updates):
        flat = np.concatenate([update[k].ravel() for k in keys])
        peers = {j: pair_seeds[(min(i, j), max(i, j))] for j in range(n) if j != i}
        uploads[i] = masked_input(encode(flat, **common), own_id=i, peers=peers,  # type: ignore[arg-type]
                                  self_seed=self_seeds[i], modulus_bits=_MODULUS_BITS)
    total = remove_masks(sum_masked(uploads, modulus_bits=_MODULUS_BITS), self_seeds=self_seeds,
                         dropped_pair_seeds={}, modulus_bits=_MODULUS_BITS)
    flat_sum = decode_sum(total, **common)  # type: ignore[arg-type]
    out: Tensors = {}
    offset = 0
    for k in keys:
        size = updates[0][k].size
        out[k] = flat_sum[offset: offset + size].reshape(updates[0][k].shape)
        offset += size
    return out


def _norm(update: Tensors) -> float:
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values())))
