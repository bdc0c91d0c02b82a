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
    noise_tail_bound,
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
    """Zhu & Wang's general Poisson-subsampling bound at integer α (2019, Thm. 9) for any
    mechanism with RDP curve ``curve``, written out independently of the accountant."""
    logs = [(alpha - 1) * math.log1p(-q) + math.log1p((alpha - 1) * q)]
    logs += [math.log(math.comb(alpha, j)) + (alpha - j) * math.log1p(-q) + j * math.log(q)
             + (j - 1) * curve[j] + (math.log(3) if j >= 3 else 0.0)
             for j in range(2, alpha + 1)]
    top = max(logs)
    return (top + math.log(math.fsum(math.exp(v - top) for v in logs))) / (alpha - 1)


def test_a_sampled_skellam_round_costs_no_more_than_the_gaussian_round_recorded() -> None:
    """At each integer order, Zhu & Wang's bound for the subsampled Skellam round is at most
    what the 'rdp-general' accountant composes for the round the ledger records at σ (the
    same bound on the Gaussian curve, matched against the accountant here)."""
    from protocols.privacy.accounting import _rdp_general_step

    sigma, q = 1.0, 0.1
    plan = plan_integer_noise(num_clients=100, threshold=67, dim=829_440, clip_norm=1.0,
                              noise_multiplier=sigma, quant_range=0.0024, levels=7)
    skellam = {a: skellam_rdp(a, variance=plan.total_variance, l2=plan.rounding_bound,
                              l1=plan.l1_bound) for a in range(2, 65)}
    gauss = {a: a / (2 * sigma**2) for a in range(2, 65)}
    for alpha in range(2, 65):
        ours = min(_poisson_subsampled_rdp(skellam, alpha, q), skellam[alpha])
        recorded = _rdp_general_step(q, sigma, float(alpha))
        assert min(_poisson_subsampled_rdp(gauss, alpha, q), gauss[alpha]) == pytest.approx(
            recorded, rel=1e-9)
        assert ours <= recorded * (1 + 1e-12)


def test_the_integer_order_accountant() -> None:
    """'rdp-general' applies Zhu & Wang's general bound (factor 3 on the terms ℓ >= 3) to
    the Gaussian curve at integer orders: above the sampled-Gaussian RDP at every order (so
    above 'rdp' restricted to the same orders), golden value at q = 0.1, σ = 1, 100 rounds."""
    from protocols.privacy.accounting import _rdp_general_step, _rdp_one_step

    history = [(1.0, 0.1, 100)]
    general = epsilon_for_history(history, delta=1e-5, accountant="rdp-general")
    assert general == pytest.approx(9.823371301243, rel=1e-9)
    gaussian = rdp_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=100, delta=1e-5,
                           orders=INTEGER_ORDERS)
    assert gaussian < general
    for alpha in INTEGER_ORDERS[:40]:
        assert _rdp_one_step(0.1, 1.0, alpha) <= _rdp_general_step(0.1, 1.0, alpha) * (1 + 1e-12)
    assert _rdp_general_step(1.0, 1.0, 3.0) == 1.5 and _rdp_general_step(0.0, 1.0, 3.0) == 0
    with pytest.raises(ValueError, match="integer orders"):
        _rdp_general_step(0.1, 1.0, 2.5)
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
    # a bound below the input's own norm is the caller's error, refused
    with pytest.raises(ValueError, match="exceeds the rounding bound"):
        conditional_round(y, bound=0.5 * float(np.linalg.norm(y)), rng=rng)
    # out of draws it rounds toward zero, within the bound whatever the data: never a failure
    # that would depend on the update
    exact = float(np.linalg.norm(y)) * (1 + 1e-12)
    np.testing.assert_array_equal(conditional_round(y, bound=exact, rng=rng, max_draws=0),
                                  np.trunc(y).astype(np.int64))


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
    assert plan.noise_bound >= 7 * math.sqrt(100 * plan.per_client_variance)
    # a plan needing more than 32 bits is refused before any device is told it
    with pytest.raises(ValueError, match="more than the 32"):
        plan_integer_noise(num_clients=100, threshold=67, dim=1000, clip_norm=10.0,
                           noise_multiplier=4.0, quant_range=1e-5, levels=127)
    # a coarse codec gets a finer grid where DP needs it: int2's scale is set by Δ2, not L
    coarse = plan_integer_noise(num_clients=10, threshold=7, dim=829_440, clip_norm=1.0,
                                noise_multiplier=1.0, quant_range=0.0024, levels=1)
    assert coarse.scale == pytest.approx(integer_norm_for(829_440))
    assert coarse.rounding_bound <= 1.05 * coarse.scale * 1.0 * (1 + 1e-9)
    with pytest.raises(ValueError, match="threshold"):
        plan_integer_noise(num_clients=3, threshold=4, dim=10, clip_norm=1.0,
                           noise_multiplier=1.0, quant_range=0.1, levels=7)


@pytest.mark.measured
def test_the_noise_tail_bound_holds_where_skellam_is_not_gaussian() -> None:
    """At a small variance the Skellam tail is heavier than a Gaussian's (8 standard
    deviations are not enough); the Bernstein bound covers it. Checked against the exact
    distribution by summing its probability mass function (scipy) at tail 1e-9."""
    from scipy.stats import skellam

    for variance in (0.05, 0.5, 5.0, 500.0):
        b = noise_tail_bound(variance, tail=1e-9)
        exact = 2 * float(skellam.sf(b, variance / 2, variance / 2))
        assert exact <= 1e-9, (variance, b, exact)
    # large variance: about 7.5 standard deviations at 1e-12
    within("bound / std at 1e-12", noise_tail_bound(1e8) / 1e4, above=7.0, below=7.8)
