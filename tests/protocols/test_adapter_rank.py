"""Heterogeneous LoRA ranks (protocols/adapter_rank.py, issue 16 point 3): slicing and
padding, FFA-LoRA's exact zero-padded mean, and the SVD re-factorisation of plain LoRA's
mean of products against the dense mean."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.adapter_rank import (
    aggregate_products,
    pad_rank,
    product_mean_factors,
    shape_at_rank,
    slice_rank,
    spec_at_rank,
)
from protocols.adapter_spec import AdapterSpec
from protocols.run_config import ConfigError, RunConfig

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"
R, OUT, IN = 8, 12, 10


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {A: rng.normal(size=(R, IN)).astype(np.float32),
            B: rng.normal(size=(OUT, R)).astype(np.float32)}


def test_slicing_and_padding_take_and_restore_the_first_components() -> None:
    g = _global()
    low = slice_rank(g, 3)
    assert low[A].shape == (3, IN) and low[B].shape == (OUT, 3)
    np.testing.assert_array_equal(low[A], g[A][:3])
    back = pad_rank(low, {k: v.shape for k, v in g.items()})
    np.testing.assert_array_equal(back[B][:, :3], g[B][:, :3])
    assert not back[B][:, 3:].any() and not back[A][3:].any()
    spec = spec_at_rank(AdapterSpec.from_arrays(g, {}, frozen=frozenset({A})), 3)
    assert spec.tensors[A].shape == (3, IN) and not spec.tensors[A].trainable
    assert shape_at_rank(B, (OUT, 3), R) == (OUT, R)


def test_ffa_zero_padded_mean_is_the_mean_of_products() -> None:
    """With A shared, mean_k pad(B_k) A = mean_k B_k A[:r_k] for any ranks."""
    g, rng = _global(), np.random.default_rng(1)
    ranks, weights = [2, 4, 8], [3.0, 1.0, 2.0]
    bs = [rng.normal(size=(OUT, r)) for r in ranks]
    padded = [pad_rank({B: b.astype(np.float32)}, {B: (OUT, R)})[B] for b in bs]
    mean_b = sum(w * p for w, p in zip(weights, padded, strict=True)) / sum(weights)
    products = sum(w * b @ g[A][:r] for w, b, r in zip(weights, bs, ranks, strict=True))
    np.testing.assert_allclose(mean_b @ g[A], products / sum(weights), rtol=1e-5, atol=1e-5)


def test_plain_lora_products_are_refactorised_exactly_when_they_fit() -> None:
    """Sum of ranks <= R: B A equals the weighted mean of the products to rounding."""
    g, rng = _global(), np.random.default_rng(2)
    updates, dense = [], np.zeros((OUT, IN))
    for r, w in ((2, 1.0), (4, 3.0), (1, 2.0)):  # 7 <= 8 components
        delta = {A: rng.normal(size=(r, IN)).astype(np.float32) * 0.1,
                 B: rng.normal(size=(OUT, r)).astype(np.float32)}
        updates.append((delta, r, w))
        dense += w * (g[B][:, :r] + delta[B]).astype(np.float64) @ (g[A][:r] + delta[A])
    dense /= 6.0
    new = aggregate_products(g, updates)
    assert new[A].shape == (R, IN) and new[B].shape == (OUT, R)
    np.testing.assert_allclose(new[B].astype(np.float64) @ new[A], dense, rtol=1e-4,
                               atol=1e-4)
    # the eighth component is empty: B = 0 there, A keeps the old row so it can learn
    assert not new[B][:, 7].any()
    np.testing.assert_array_equal(new[A][7], g[A][7])


def test_plain_lora_products_beyond_the_rank_give_the_best_rank_r_approximation() -> None:
    rng = np.random.default_rng(3)
    factors = [(rng.normal(size=(OUT, r)), rng.normal(size=(r, IN))) for r in (4, 4, 3)]
    weights = [1.0, 1.0, 2.0]
    b, a = product_mean_factors(factors, weights, 5, fill_a=np.zeros((5, IN)))
    dense = sum(w * fb @ fa for (fb, fa), w in zip(factors, weights, strict=True)) / 4.0
    u, s, vt = np.linalg.svd(dense)
    best = (u[:, :5] * s[:5]) @ vt[:5]
    np.testing.assert_allclose(b.astype(np.float64) @ a, best, rtol=1e-4, atol=1e-4)
    # B = U sqrt(S), A = sqrt(S) V^T: balanced factors
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1),
                               rtol=1e-4)


def test_the_config_gives_each_device_a_rank_and_refuses_what_cannot_aggregate() -> None:
    config = RunConfig.from_nested({"lora": {"r": 16, "device_ranks": [4, 8, 16]}})
    assert [config.lora.rank_of(i) for i in range(4)] == [4, 8, 16, 4]
    assert config.lora.heterogeneous and config.lora.at_rank(4).alpha == 4.0
    assert config.lora.at_rank(4).alpha / 4 == config.lora.alpha / 16  # one scaling
    own = RunConfig.from_flat({**config.to_flat(), "lora.device_rank": 2})
    assert own.lora.rank_of(2) == 2  # a device's own setting wins
    with pytest.raises(ConfigError, match=r"a device's rank must be in \[1, lora.r = 8\]"):
        RunConfig.from_nested({"lora": {"device_ranks": [4, 16]}})
    with pytest.raises(ConfigError, match="FlexLoRA's SVD"):
        RunConfig.from_nested({"lora": {"r": 8, "device_ranks": [4], "freeze_a": False}})
    plain = RunConfig.from_nested({"lora": {"device_ranks": [4], "freeze_a": False},
                                   "security": {"secagg": False}})
    assert plain.lora.heterogeneous
