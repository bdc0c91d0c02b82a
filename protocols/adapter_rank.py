"""Heterogeneous LoRA ranks: every device trains the rank it can afford, one global adapter.

The global adapter has rank ``R`` (``lora.r``); a device of rank ``r <= R`` trains the first
``r`` components: rows ``A[:r]`` and columns ``B[:, :r]`` (:func:`slice_rank`), with the
global scaling ``alpha / R`` (its own ``lora_alpha`` is ``alpha · r / R``), so its model is
the global one restricted to those components and every device's product ``B_k A_k`` lives
in the same weight space.

Aggregating the products exactly:

* **FFA-LoRA** (A frozen, shared): ``B_k A[:r_k] = pad(B_k) A``, so the mean of the
  zero-padded B's (:func:`pad_rank`) times A *is* the mean of the products (HetLoRA's
  zero-padding, exact here because A is common). Padding is linear, so it also runs under
  secure aggregation (the device pads before masking) and client-level DP.
* **Plain LoRA** (A trained): the mean of products ``Σ w_k B_k A_k`` is not a product of
  means, so the coordinator forms it and re-factorises it at rank ``R`` by SVD (FlexLoRA,
  Bai et al. 2024): :func:`product_mean_factors`. It never builds the dense matrix: the
  mean is ``B_cat A_cat`` with ``B_cat = [w_1 B_1 … w_K B_K]``, so two thin QRs and an SVD
  of a ``(Σ r_k)²`` core give the exact truncated SVD. This needs each device's factors in
  the clear: the config refuses it under secure aggregation and client-level DP.

PEFT's key spelling tells the factors apart: ``….lora_A.weight`` is ``(r, in)``,
``….lora_B.weight`` is ``(out, r)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.adapter_spec import AdapterSpec, Tensors, TensorSpec

A_TAG, B_TAG = ".lora_A.", ".lora_B."


def is_a(key: str) -> bool:
    return A_TAG in key


def is_b(key: str) -> bool:
    return B_TAG in key


def _rank_slice(key: str, r: int) -> tuple[slice, ...]:
    if is_a(key):
        return (slice(0, r), slice(None))
    if is_b(key):
        return (slice(None), slice(0, r))
    return (slice(None),)


def shape_at_rank(key: str, shape: tuple[int, ...], r: int) -> tuple[int, ...]:
    """The shape of tensor ``key`` in an adapter of rank ``r``."""
    if is_a(key):
        return (r, *shape[1:])
    if is_b(key):
        return (shape[0], r)
    return shape


def slice_rank(tensors: Mapping[str, npt.NDArray[Any]], r: int) -> Tensors:
    """The first ``r`` components of each factor (other tensors as they are)."""
    return {k: np.ascontiguousarray(v[_rank_slice(k, r)]) for k, v in tensors.items()}


def pad_rank(tensors: Mapping[str, npt.NDArray[Any]], full: Mapping[str, tuple[int, ...]]
             ) -> Tensors:
    """Each tensor zero-padded to the shape ``full`` names for it (rank ``R``)."""
    out: Tensors = {}
    for key, value in tensors.items():
        if tuple(value.shape) == tuple(full[key]):
            out[key] = value
            continue
        padded = np.zeros(full[key], np.float32)
        padded[tuple(slice(0, d) for d in value.shape)] = value
        out[key] = padded
    return out


def adapter_rank(spec: AdapterSpec) -> int:
    """The global rank ``R``: the rows of any A (0 for an adapter without LoRA factors)."""
    return next((t.shape[0] for k, t in spec.tensors.items() if is_a(k)), 0)


def spec_at_rank(spec: AdapterSpec, r: int) -> AdapterSpec:
    """The spec of a rank-``r`` device's adapter."""
    return replace(spec, tensors={
        k: TensorSpec(shape=shape_at_rank(k, t.shape, r), trainable=t.trainable)
        for k, t in spec.tensors.items()})


def modules(keys: Sequence[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every adapted module."""
    pairs = []
    for key in sorted(keys):
        if is_a(key):
            b = key.replace(A_TAG, B_TAG)
            if b not in keys:
                raise ValueError(f"`{key}` has no matching `{b}`")
            pairs.append((key, b))
    return pairs


def product_mean_factors(
    factors: Sequence[tuple[npt.NDArray[Any], npt.NDArray[Any]]], weights: Sequence[float],
    rank: int, fill_a: npt.NDArray[Any],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(B, A)`` of rank ``rank`` whose product is the best rank-``rank`` approximation of
    ``Σ w_k B_k A_k`` (exactly it when ``Σ r_k <= rank``), split ``B = U √S``,
    ``A = √S Vᵀ``.

    When the mean has fewer than ``rank`` components, the missing ones get B = 0 and the
    rows of ``fill_a`` (the previous global A): a zero product that can still learn, as at
    LoRA's initialisation (zero in both factors would never receive a gradient).
    """
    total = float(sum(weights))
    b_cat = np.concatenate([np.asarray(b, np.float64) * (w / total)
                            for (b, _), w in zip(factors, weights, strict=True)], axis=1)
    a_cat = np.concatenate([np.asarray(a, np.float64) for _, a in factors], axis=0)
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    k = min(rank, int(np.count_nonzero(s > s[0] * 1e-12)) if s.size and s[0] > 0 else 0)
    root = np.sqrt(s[:k])
    b_new = np.zeros((b_cat.shape[0], rank))
    a_new = np.array(fill_a, np.float64, copy=True)
    b_new[:, :k] = (q_b @ u[:, :k]) * root
    a_new[:k] = root[:, None] * (vt[:k] @ q_a.T)
    return b_new.astype(np.float32), a_new.astype(np.float32)


def aggregate_products(
    global_adapter: Mapping[str, npt.NDArray[Any]],
    updates: Sequence[tuple[Mapping[str, npt.NDArray[Any]], int, float]],
) -> Tensors:
    """The new global adapter of a plain-LoRA round with mixed ranks: per module, each
    device's factors (the global slice it trained from plus its delta) multiplied and
    averaged with its weight, then re-factorised at the global rank."""
    out = dict(global_adapter)
    rank = next(v.shape[0] for k, v in global_adapter.items() if is_a(k))
    for a_key, b_key in modules(list(global_adapter)):
        factors, weights = [], []
        for delta, r, weight in updates:
            a = global_adapter[a_key][:r].astype(np.float64) + delta[a_key]
            b = global_adapter[b_key][:, :r].astype(np.float64) + delta[b_key]
            factors.append((b, a))
            weights.append(weight)
        out[b_key], out[a_key] = product_mean_factors(factors, weights, rank,
                                                      fill_a=global_adapter[a_key])
    return out
