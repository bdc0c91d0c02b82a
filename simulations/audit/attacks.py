"""Text gradient-inversion attacks on LoRA updates, as the coordinator can run them.

Two families, both adapted from attacks on full-model gradients to what a fedtune client
uploads (LoRA tensors after one or several AdamW steps, no embedding gradient):

* :func:`bag_of_tokens_scores` — analytic. After the last decoder layer, the gradient that
  reaches the residual stream at position ``t`` is ``delta_t = J_t W^T (p_t - e_{y_t})``
  (``W`` the output head, ``J_t`` the final RMSNorm's Jacobian, ``y_t`` the next token); the
  skip connections carry it unchanged into the residual stream of the layers below, plus
  corrections from the blocks in between. The LoRA factor ``B`` of a module writing into
  that stream (``o_proj``, ``down_proj``) has the gradient ``sum_t delta_t (A x_t)^T``: its
  columns lie in the span of the ``delta_t``, and so close to the span of the output rows
  ``W[y_t]`` of the tokens in the batch. Scoring every vocabulary row by its projection on
  the column span of the last layers' ``B`` updates recovers the bag of tokens, as the
  embedding gradient does for full fine-tuning (Melis et al., S&P 2019; used by TAG, Deng
  et al., EMNLP 2021 Findings, and LAMP, Balunovic et al., NeurIPS 2022). Measured on
  SmolLM2 (first 6 layers, 4 targets, 16-token sequences), recall at batch 1 / 4 / 16 was
  0.37 / 0.30 / 0.21 from the last layer alone and 0.62 / 0.50 / 0.21 from the last three
  layers with the leading shared embedding direction removed (the defaults).
* :func:`optimization_attack` — DLG (Zhu et al., NeurIPS 2019) / TAG: optimise dummy inputs
  until the update they would produce matches the observed one. As in LAMP the inputs are
  relaxed (here a softmax over candidate tokens per position, labels tied to the next
  position's relaxed token) and the candidates come from the analytic bag; the result is
  projected back to tokens.

AdamW's first step is ``-lr * g / (|g| + eps)`` (bias correction makes ``m_hat = g`` and
``v_hat = g^2``): the magnitudes of the gradient are gone, only its signs are sent. Several
steps on the same batch keep roughly that sign pattern. The optimisation attack therefore
models the update as a smoothed sign of the dummy gradient (``update_model="adam"``), and
approximates several local steps by one gradient, which keeps one attack step at one
second-order gradient.

Budget: on a CPU each attack step costs a second-order gradient through the model
(~1 s at batch 1, ~8 s at batch 16 on 4 SmolLM2 layers), so the audit runs about ten. The
objective itself is sharp — on SmolLM2 at batch 1 the true text scores 1.3 and its
shuffles ~38 (:func:`matching_distance`) — but ten relaxed steps do not find the order of
the tokens, only many of the tokens: the recovery rates are those of a bounded-budget
attacker, and more steps (``--opt-iters``), or LAMP's discrete reordering steps, would raise
them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.adapter_spec import TensorsView

DISTANCES = ("tag", "cos")
UPDATE_MODELS = ("adam", "sgd")
#: LoRA-adapted modules whose output is added to the residual stream.
RESIDUAL_WRITERS = ("o_proj", "down_proj")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


# -- analytic bag of tokens ------------------------------------------------------------
def residual_writer_keys(keys: Sequence[str], *, last_layers: int = 1) -> list[str]:
    """The ``lora_B`` keys of residual-writing modules in the last ``last_layers`` layers."""
    found: dict[int, list[str]] = {}
    for key in keys:
        match = _LAYER.search(key)
        if match and ".lora_B." in key and any(f".{m}." in key for m in RESIDUAL_WRITERS):
            found.setdefault(int(match.group(1)), []).append(key)
    if not found:
        raise ValueError(f"no lora_B of {RESIDUAL_WRITERS} among the update's keys; the "
                         "bag-of-tokens attack needs an adapter on o_proj or down_proj")
    layers = sorted(found)[-last_layers:]
    return sorted(k for layer in layers for k in found[layer])


@dataclass(frozen=True)
class TokenBasis:
    """Every token's residual-stream direction, cleaned of what all updates share.

    ``directions`` ``(V, d)`` are the output-head rows, centred (the softmax-average term
    ``sum_v p_v W[v]`` is common to every position) and with the ``removed`` ``(k, d)``
    leading principal directions of the rows projected out: the embeddings of trained LMs
    are anisotropic (a few directions shared by all rows, Ethayarajh, EMNLP 2019), so those
    directions are in every update and say nothing about which tokens were in the batch.
    The final RMSNorm's weight is deliberately not applied: on SmolLM2 it lowered recall.
    """

    directions: npt.NDArray[np.float64]
    removed: npt.NDArray[np.float64]

    @classmethod
    def from_output_head(cls, weight: npt.NDArray[np.float32], *,
                         drop_components: int = 1) -> TokenBasis:
        rows = weight.astype(np.float64)
        rows = rows - rows.mean(axis=0, keepdims=True)
        removed = np.zeros((0, rows.shape[1]))
        if drop_components > 0:
            # Leading right singular vectors from the (d, d) Gram matrix: cheap for V >> d.
            evals, evecs = np.linalg.eigh(rows.T @ rows)
            removed = evecs[:, np.argsort(evals)[::-1][:drop_components]].T
            rows = rows - (rows @ removed.T) @ removed
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return cls(rows, removed)

    @property
    def vocab_size(self) -> int:
        return int(self.directions.shape[0])


def bag_of_tokens_scores(update: TensorsView, keys: Sequence[str],
                         basis: TokenBasis) -> npt.NDArray[np.float64]:
    """Score every token by how much of its direction lies in the span of the B updates.

    ``update[k]`` is ``(d, r)`` for each residual-writing ``lora_B`` key; each is scaled to
    unit Frobenius norm (so no layer dominates), the basis's shared directions are projected
    out, and the columns are stacked into ``M`` ``(d, r * len(keys))``. The score of token
    ``v`` is ``||Q^T u_v||``, with ``Q`` an orthonormal basis of the leading left singular
    vectors of ``M`` (those carrying 99 % of its energy): the cosine between ``u_v`` and
    the column span.
    """
    cols = []
    for key in keys:
        mat = np.asarray(update[key], dtype=np.float64)
        norm = np.linalg.norm(mat)
        if norm > 0:
            cols.append(mat / norm)
    if not cols:
        return np.zeros(basis.vocab_size)
    stacked = np.concatenate(cols, axis=1)  # (d, r * n_keys)
    stacked -= basis.removed.T @ (basis.removed @ stacked)
    u, s, _ = np.linalg.svd(stacked, full_matrices=False)
    energy = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-30)
    rank = int(np.searchsorted(energy, 0.99) + 1)
    return np.asarray(np.linalg.norm(basis.directions @ u[:, :rank], axis=1), dtype=np.float64)


def top_k(scores: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.int64]:
    """The ``k`` highest-scoring token ids (ties broken by id, so the result is stable)."""
    k = max(0, min(k, scores.size))
    order = np.lexsort((np.arange(scores.size), -scores))
    return np.asarray(order[:k], dtype=np.int64)


# -- optimisation attack (DLG / TAG with a LAMP-style relaxation) -----------------------
@dataclass(frozen=True, kw_only=True)
class OptimizationSettings:
    """Budget and objective of :func:`optimization_attack`."""

    iterations: int = field(default=10, metadata={"help": "Adam steps on the dummy inputs"})
    step_size: float = field(default=0.3, metadata={"help": "Adam learning rate on logits"})
    distance: str = field(default="tag", metadata={"help": f"one of {DISTANCES}"})
    tag_alpha: float = field(default=0.01, metadata={"help": "TAG's L1 weight"})
    update_model: str = field(default="adam", metadata={"help": f"one of {UPDATE_MODELS}"})
    candidates: int = field(
        default=0, metadata={"help": "tokens kept from the bag; 0 = 2 x batch x seq_len"})
    lm_weight: float = field(
        default=0.0, metadata={"help": "weight of the global model's own loss on the dummy "
                                       "text (LAMP's language-model prior)"})

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.update_model not in UPDATE_MODELS:
            raise ValueError(f"update_model must be one of {UPDATE_MODELS}, "
                             f"got {self.update_model!r}")
        if self.candidates < 0:
            raise ValueError(f"candidates must be >= 0, got {self.candidates}")
        if self.lm_weight < 0:
            raise ValueError(f"lm_weight must be >= 0, got {self.lm_weight}")


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Second-order gradients need the eager attention kernel (SDPA's has no double backward)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def trainable_by_key(model: Any, keys: Sequence[str]) -> dict[str, Any]:
    """The model's trainable LoRA parameters under the update's (PEFT state-dict) keys."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", name)  # drop the adapter name
            out[key] = param
    missing = sorted(set(keys) - set(out))
    if missing:
        raise ValueError(f"update keys {missing[:3]} are not trainable tensors of the model")
    return {k: out[k] for k in keys}


def _modelled_update(grad: Any, update_model: str) -> Any:
    """The direction the client's optimiser moves along, from a gradient (negated)."""
    if update_model == "sgd":
        return -grad
    # Adam's first step, -g/(|g| + eps), with eps scaled to the tensor so it stays smooth.
    tau = 0.05 * grad.detach().abs().mean() + 1e-12
    return -grad / (grad * grad + tau * tau).sqrt()


def _distance(pred: Sequence[Any], observed: Sequence[Any], settings: OptimizationSettings) -> Any:
    total = 0.0
    for p, o in zip(pred, observed, strict=True):
        p_hat = p / (p.norm() + 1e-12)
        if settings.distance == "cos":
            total = total + (1.0 - (p_hat * o).sum())
        else:  # TAG: L2 + alpha L1, here on unit-norm tensors (the scale is lr- and m-dependent)
            diff = p_hat - o
            total = total + (diff * diff).sum() + settings.tag_alpha * diff.abs().sum()
    return total


class _Matcher:
    """The attack's objective: how far the update of a relaxed batch is from the observed one.

    Holds the model with the global adapter loaded, the matched parameters and the observed
    update's unit-norm tensors; the caller enters :func:`eager_attention` around its use.
    """

    def __init__(self, model: Any, global_adapter: TensorsView, observed: TensorsView,
                 cand: Any, settings: OptimizationSettings) -> None:
        import torch

        from kernels.lora import set_adapter

        keys = [k for k in sorted(observed) if float(np.abs(observed[k]).sum()) > 0]
        if not keys:
            raise ValueError("the observed update is all zeros: nothing to match")
        set_adapter(model, global_adapter)
        self.model = model
        self.params = list(trainable_by_key(model, keys).values())
        self.target = []
        for k in keys:
            t = torch.from_numpy(np.asarray(observed[k], dtype=np.float32))
            self.target.append(t / (t.norm() + 1e-12))
        self.cand = cand
        self.embed = model.get_input_embeddings().weight.detach()[cand]  # (C, d)
        self.settings = settings

    def objective(self, soft: Any) -> Any:
        """Distance (plus the LM prior) for ``soft`` ``(B, S, C)`` distributions over tokens."""
        import torch

        out = self.model(inputs_embeds=soft @ self.embed).logits  # (B, S, V)
        logp = torch.log_softmax(out[:, :-1], dim=-1)[..., self.cand]  # (B, S-1, C)
        loss = -(soft[:, 1:] * logp).sum(-1).mean()  # the trainer's mean next-token CE
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        pred = [_modelled_update(g, self.settings.update_model) for g in grads]
        return _distance(pred, self.target, self.settings) + self.settings.lm_weight * loss

    def release(self) -> None:
        for p in self.params:
            p.grad = None


def matching_distance(model: Any, global_adapter: TensorsView, observed: TensorsView,
                      tokens: npt.NDArray[np.int64], settings: OptimizationSettings) -> float:
    """The attack's objective at a discrete batch ``tokens`` ``(B, S)``: a diagnostic (the
    ground truth should score lower than its shuffles)."""
    import torch

    cand, index = np.unique(tokens, return_inverse=True)
    soft = torch.nn.functional.one_hot(torch.from_numpy(index.reshape(tokens.shape)),
                                       len(cand)).float()
    matcher = _Matcher(model, global_adapter, observed, torch.from_numpy(cand), settings)
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model):
            return float(matcher.objective(soft).detach())
    finally:
        model.train(was_training)
        matcher.release()


def optimization_attack(
    model: Any,
    global_adapter: TensorsView,
    observed: TensorsView,
    *,
    batch_size: int,
    seq_len: int,
    prior: npt.NDArray[np.float64],
    settings: OptimizationSettings,
    seed: int,
) -> npt.NDArray[np.int64]:
    """Reconstruct ``(batch_size, seq_len)`` token ids whose update matches ``observed``.

    ``prior`` scores every vocabulary token (the bag-of-tokens scores); the top
    ``settings.candidates`` become the relaxed alphabet. Only tensors the client moved
    (non-zero observed update) are matched.
    """
    import torch

    n_cand = settings.candidates or 2 * batch_size * seq_len
    cand = torch.from_numpy(top_k(prior, n_cand))
    matcher = _Matcher(model, global_adapter, observed, cand, settings)
    gen = torch.Generator().manual_seed(seed)
    logits_z = (0.1 * torch.randn(batch_size, seq_len, len(cand), generator=gen)).requires_grad_()
    opt = torch.optim.Adam([logits_z], lr=settings.step_size)
    was_training = model.training
    model.eval()  # dropout off: the attacker's best estimate of the client's forward pass
    try:
        with eager_attention(model):
            for _ in range(settings.iterations):
                dist = matcher.objective(torch.softmax(logits_z, dim=-1))
                opt.zero_grad()
                dist.backward()
                opt.step()
    finally:
        model.train(was_training)
        matcher.release()
    best = logits_z.detach().argmax(dim=-1)  # (B, S)
    return np.asarray(cand[best].numpy(), dtype=np.int64)
