"""The Skellam mechanism of quantized secure aggregation with DP (issue 16, point 2): its RDP
bound, the variance that keeps it under the Gaussian the ledger records, the sampled
accounting at integer orders, conditional rounding, and the noise itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocols.privacy import INTEGER_ORDERS, epsilon_for_history, rdp_epsilon
from protocols.privacy.skellam import (
    conditional_round,
    integer_norm_for,
    l1_bound,
    rounding_norm_bound,
    sample_skellam,
    skellam_rdp,
    skellam_variance_for,
)
from protocols.secagg.integer_noise import plan_integer_noise
from tests.measured import within


def test_skellam_rdp_golden_value() -> None:
    """Agarwal et al. 2021, Thm. 3.5, worked by hand: α = 4, μ = 100, Δ2 = 3, Δ1 = 5:
    4·9/200 = 0.18, min((7·9 + 30)/40000, 15/200) = min(0.002325, 0.075) = 0.002325."""
    assert skellam_rdp(4, variance=100.0, l2=3.0, l1=5.0) == pytest.approx(0.182325, rel=1e-12)
    # at a large variance it is the Gaussian's α Δ2² / (2μ) and a vanishing remainder
    big = skellam_rdp(8, variance=1e8, l2=1e4, l1=1e8)
    assert big == pytest.approx(8 * 1e8 / 2e8, rel=1e-6)
    with pytest.raises(ValueError, match="alpha must be > 1"):
        skellam_rdp(1.0, variance=1.0, l2=1.0, l1=1.0)


@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.0, 2.5])
@pytest.mark.parametrize(("l2", "dim"), [(1.0, 1), (3.0, 40), (50.0, 10_000), (2955.0, 829_440)])
def test_the_variance_keeps_skellam_under_the_gaussian_at_every_order(
        sigma: float, l2: float, dim: int) -> None:
    """ε_Skellam(α) <= α / (2σ²) for every α >= 2 (checked to 2000; the bound's slope in α
    is below the Gaussian's for good), and μ is σ²Δ2² up to the small remainder."""
    l1 = l1_bound(l2, dim)
    mu = skellam_variance_for(sigma, l2=l2, l1=l1)
    for alpha in range(2, 2001):
        assert skellam_rdp(alpha, variance=mu, l2=l2, l1=l1) <= alpha / (2 * sigma**2) * (
            1 + 1e-12), alpha
    assert mu >= sigma**2 * l2**2
    if sigma * l2 >= 100:
        assert mu <= sigma**2 * l2**2 * 1.01


def _poisson_subsampled_rdp(curve: dict[int, float], alpha: int, q: float) -> float:
    """The general Poisson-subsampling bound at integer α (Zhu & Wang 2019; Steinke 2022),
    written out independently of the accountant as the test's oracle."""
    logs = [(alpha - 1) * math.log1p(-q) + math.log1p((alpha - 1) * q)]
    logs += [math.log(math.comb(alpha, j)) + (alpha - j) * math.log1p(-q) + j * math.log(q)
             + (j - 1) * curve[j] for j in range(2, alpha + 1)]
    top = max(logs)
    return (top + math.log(math.fsum(math.exp(v - top) for v in logs))) / (alpha - 1)


def test_a_sampled_skellam_round_costs_no_more_than_the_gaussian_round_recorded() -> None:
    """At each integer order, the subsampled Skellam bound is at most the sampled Gaussian's
    RDP the ledger's 'rdp-integer' accountant composes; so ε from the ledger covers it. The
    general bound with the Gaussian's own curve *is* the sampled-Gaussian RDP (a check of
    the oracle against the accountant)."""
    from protocols.privacy.accounting import _rdp_one_step

    sigma, q = 1.0, 0.1
    plan = plan_integer_noise(num_clients=100, threshold=67, dim=829_440, clip_norm=1.0,
                              noise_multiplier=sigma, quant_range=0.0024, levels=7)
    skellam = {a: skellam_rdp(a, variance=plan.total_variance, l2=plan.rounding_bound,
                              l1=plan.l1_bound) for a in range(2, 65)}
    gauss = {a: a / (2 * sigma**2) for a in range(2, 65)}
    for alpha in range(2, 65):
        ours = _poisson_subsampled_rdp(skellam, alpha, q)
        recorded = _rdp_one_step(q, sigma, float(alpha))
        assert _poisson_subsampled_rdp(gauss, alpha, q) == pytest.approx(recorded, rel=1e-9)
        assert ours <= recorded * (1 + 1e-12)


def test_the_integer_order_accountant() -> None:
    """'rdp-integer' is the RDP accountant over orders 2..256: never below 'rdp' (fewer
    orders to optimise over), and close to it at the usual parameters."""
    history = [(1.0, 0.1, 100)]
    integer = epsilon_for_history(history, delta=1e-5, accountant="rdp-integer")
    fractional = epsilon_for_history(history, delta=1e-5, accountant="rdp")
    assert integer == rdp_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=100,
                                  delta=1e-5, orders=INTEGER_ORDERS)
    assert fractional <= integer <= fractional * 1.05
    assert INTEGER_ORDERS[0] == 2 and all(float(a).is_integer() for a in INTEGER_ORDERS)


def test_rounding_norm_bound_and_the_scale_that_keeps_inflation_small() -> None:
    # 100² + 400/4 + sqrt(2 ln 1e6)·(100 + 10): by hand
    want = math.sqrt(100**2 + 100 + math.sqrt(2 * math.log(1e6)) * 110)
    assert rounding_norm_bound(100.0, 400) == pytest.approx(want, rel=1e-12)
    assert rounding_norm_bound(0.1, 1) == pytest.approx(1.1)  # the (v + √d)² branch
    for dim in (10, 10_000, 829_440):
        v = integer_norm_for(dim)
        assert rounding_norm_bound(v, dim) <= 1.05 * v * (1 + 1e-9)
        assert rounding_norm_bound(0.99 * v, dim) > 1.05 * 0.99 * v


@pytest.mark.measured
def test_conditional_rounding_is_unbiased_and_never_exceeds_the_bound() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=2000) * 3.0
    bound = rounding_norm_bound(float(np.linalg.norm(y)), y.size)
    draws = np.stack([conditional_round(y, bound=bound, rng=rng) for _ in range(400)])
    assert draws.dtype == np.int64
    assert np.all(np.abs(draws - y) < 1)
    assert np.all(np.sqrt((draws.astype(np.float64) ** 2).sum(axis=1)) <= bound)
    # the mean of 400 draws is within a few standard errors (<= 0.5/20) of y per coordinate
    within("max |mean - y|", float(np.abs(draws.mean(axis=0) - y).max()), below=0.15)
    # a bound below what any rounding can reach is refused, not silently exceeded
    tight = float(np.linalg.norm(np.floor(np.abs(y)))) * 0.5
    with pytest.raises(ValueError, match="exceeded the L2 bound"):
        conditional_round(y, bound=tight, rng=rng, max_draws=3)


@pytest.mark.measured
def test_skellam_noise_has_the_variance_asked_and_sums_to_skellam() -> None:
    rng = np.random.default_rng(1)
    one = sample_skellam(rng, 50.0, 200_000)
    assert one.dtype == np.int64
    within("|mean|", abs(float(one.mean())), below=0.1)  # std error 0.016
    within("|var / 50 - 1|", abs(float(one.var()) / 50.0 - 1), below=0.02)  # s.e. 0.3 %
    summed = sum(sample_skellam(rng, 12.5, 200_000) for _ in range(4))
    within("|var of a sum of 4 / 50 - 1|", abs(float(summed.var()) / 50.0 - 1), below=0.02)


def test_the_plan_sizes_the_modulus_for_codes_and_noise() -> None:
    """σ = 1 over a LoRA-sized update: 16 bits (against 32 for the exact fixed point), the
    noise std within 2 % of σ·C, codes and 8 noise standard deviations inside the modulus."""
    plan = plan_integer_noise(num_clients=100, threshold=67, dim=829_440, clip_norm=1.0,
                              noise_multiplier=1.0, quant_range=0.0024, levels=7)
    assert plan.modulus_bits == 16
    assert 1.0 <= plan.noise_std <= 1.02
    assert plan.per_client_variance * 67 == pytest.approx(plan.total_variance)
    codes = 100 * math.ceil(plan.clip_range * plan.scale)
    assert codes + plan.noise_bound < 2 ** (plan.modulus_bits - 1)
    assert plan.noise_bound >= 8 * math.sqrt(100 * plan.per_client_variance)
    # a coarse codec gets a finer grid where DP needs it: int2's scale is set by Δ2, not L
    coarse = plan_integer_noise(num_clients=10, threshold=7, dim=829_440, clip_norm=1.0,
                                noise_multiplier=1.0, quant_range=0.0024, levels=1)
    assert coarse.scale == pytest.approx(integer_norm_for(829_440))
    assert coarse.rounding_bound <= 1.05 * coarse.scale * 1.0 * (1 + 1e-9)
    with pytest.raises(ValueError, match="threshold"):
        plan_integer_noise(num_clients=3, threshold=4, dim=10, clip_norm=1.0,
                           noise_multiplier=1.0, quant_range=0.1, levels=7)
