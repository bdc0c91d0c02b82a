"""Distributed DP in integers: the Skellam mechanism for quantized uploads under secure aggregation.

Why: a quantized upload inside secure aggregation sums *integers*. If each device adds its
share of Gaussian noise and then rounds, the sum of the rounded shares is not the Gaussian sum
the accountant covers (every rounding depends on that device's own, barely noised value).
The remedy (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS; Kairouz, Liu & Steinke 2021 for the rounding) adds the noise
*after* rounding, in the integers, from a family closed under sums:

1. clip the update to L2 norm ``C`` (and each coordinate to the codec's range), scale by ``s``;
2. round stochastically, drawing again until the integer vector's L2 norm is at most
   ``Δ2`` (:func:`conditional_round`; :func:`rounding_norm_bound` makes a redraw rare), so the
   integer sensitivity is ``Δ2`` by construction and ``Δ1 <= min(Δ2², √d·Δ2)``;
3. add Skellam noise ``Pois(v/2) - Pois(v/2)`` per coordinate (variance ``v``). The sum over
   ``t`` devices is again Skellam, of variance ``μ = t·v``.

Rényi DP of the sum (Agarwal et al. 2021, Thm. 3.5 in multi-dimensional form), for α > 1::

    ε(α) <= α Δ2² / (2μ) + min(((2α - 1) Δ2² + 6 Δ1) / (4μ²), 3 Δ1 / (2μ))

:func:`skellam_variance_for` picks ``μ`` so that ``ε(α) <= α / (2σ²)`` — the RDP of the
Gaussian mechanism with noise multiplier ``σ`` — at *every* order ``α >= 2``. The ledger then
records the round at ``σ`` as before, and the accountant ``'rdp-general'`` composes it with
Zhu & Wang's mechanism-agnostic Poisson-subsampling bound (2019, "Poisson Subsampled Rényi
Differential Privacy", ICML, Thm. 9: integer orders, add/remove neighbours, increasing in the
mechanism's ``ε(2..α)``) applied to that Gaussian curve — an upper bound on the subsampled
Skellam round. The tighter sampled-Gaussian analysis (``'rdp'``, ``'pld'``) relies on the
noise being Gaussian and does not cover it; Google's distributed-DP accounting of the
Skellam mechanism uses the same general bound.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

#: Probability that one stochastic rounding overshoots :func:`rounding_norm_bound` (a redraw).
ROUNDING_BETA = 1e-6
#: Redraws before a device gives up (each fails with probability below ``ROUNDING_BETA``).
MAX_ROUNDING_DRAWS = 64
#: How much the rounding may inflate the sensitivity: ``Δ2 <= (1 + this) · s·C``.
SENSITIVITY_INFLATION = 0.05
#: Probability per coordinate that the summed noise leaves the room the modulus keeps for it.
NOISE_TAIL = 1e-12


def rounding_norm_bound(norm: float, dim: int, *, beta: float = ROUNDING_BETA) -> float:
    """``Δ2``: an L2 bound that stochastic rounding of a vector of norm ``norm`` in ``dim``
    coordinates exceeds with probability at most ``beta`` (Kairouz, Liu & Steinke 2021, "The
    Distributed Discrete Gaussian Mechanism", ICML, conditional randomized rounding)::

        Δ2² = min(norm² + dim/4 + sqrt(2 ln(1/β)) · (norm + sqrt(dim)/2), (norm + sqrt(dim))²)
    """
    _check_positive("norm", norm)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    root_d = math.sqrt(dim)
    tail = math.sqrt(2.0 * math.log(1.0 / beta)) * (norm + root_d / 2.0)
    return math.sqrt(min(norm**2 + dim / 4.0 + tail, (norm + root_d) ** 2))


def noise_tail_bound(variance: float, *, tail: float = NOISE_TAIL) -> int:
    """An integer ``b`` with ``P(|X| > b) <= tail`` for Skellam noise ``X`` of this variance.

    A Skellam variable is a limit of sums of independent ±Bernoulli terms, each within 1 of
    its mean, so Bernstein's inequality holds: ``P(|X| >= t) <= 2 exp(-t² / (2(v + t/3)))``;
    ``b`` is its positive root at ``tail`` (≈ 7.5 standard deviations at large variance,
    more at small, where the tail is heavier than a Gaussian's)."""
    _check_positive("variance", variance)
    if not 0.0 < tail < 1.0:
        raise ValueError(f"tail must be in (0, 1), got {tail!r}")
    c = math.log(2.0 / tail)
    return math.ceil(c / 3.0 + math.sqrt(c * c / 9.0 + 2.0 * c * variance))


def integer_norm_for(dim: int, *, inflation: float = SENSITIVITY_INFLATION) -> float:
    """The smallest scaled clip norm ``s·C`` whose rounding bound is within ``1 + inflation``
    of it: below it the rounding, not the update, sets the noise."""
    if not inflation > 0:
        raise ValueError(f"inflation must be > 0, got {inflation!r}")
    lo, hi = 1e-9, 1.0
    while rounding_norm_bound(hi, dim) > (1.0 + inflation) * hi:
        lo, hi = hi, 2.0 * hi
    for _ in range(100):  # bisection: the ratio Δ2(v)/v falls as v grows
        mid = (lo + hi) / 2.0
        if rounding_norm_bound(mid, dim) > (1.0 + inflation) * mid:
            lo = mid
        else:
            hi = mid
    return hi


def l1_bound(l2: float, dim: int) -> float:
    """``Δ1`` of an integer vector with L2 norm at most ``l2``: each nonzero integer has
    ``|r| <= r²``, and Cauchy-Schwarz gives ``√d · Δ2``."""
    return min(l2 * l2, math.sqrt(dim) * l2)


def skellam_rdp(alpha: float, *, variance: float, l2: float, l1: float) -> float:
    """RDP of order ``alpha`` of the Skellam mechanism of total variance ``variance`` on integer
    inputs with sensitivities ``l2`` and ``l1`` (Agarwal et al. 2021, Thm. 3.5)."""
    if not alpha > 1:
        raise ValueError(f"alpha must be > 1, got {alpha!r}")
    _check_positive("variance", variance)
    gaussian = alpha * l2**2 / (2.0 * variance)
    extra = min(((2.0 * alpha - 1.0) * l2**2 + 6.0 * l1) / (4.0 * variance**2),
                3.0 * l1 / (2.0 * variance))
    return gaussian + extra


def skellam_variance_for(noise_multiplier: float, *, l2: float, l1: float) -> float:
    """The total variance ``μ`` at which the Skellam mechanism's RDP is at most the Gaussian's
    ``α / (2σ²)`` at every order ``α >= 2``.

    Using the first branch of the bound, ``(2α-1)Δ2²/(4μ²) <= αΔ2²/(2μ²)`` and, as ``α >= 2``,
    ``6Δ1/(4μ²) <= α·3Δ1/(4μ²)``; so it suffices that ``Δ2²/μ + (Δ2² + 1.5Δ1)/μ² <= 1/σ²``, a
    quadratic in ``u = 1/μ`` whose positive root is returned (inverted). At the sizes we use,
    ``μ`` exceeds the Gaussian's ``σ²Δ2²`` by a relative ``~1/(σΔ2)²``.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("l2", l2)
    a = l2**2 + 1.5 * l1
    b = l2**2
    c = 1.0 / noise_multiplier**2
    u = 2.0 * c / (b + math.sqrt(b * b + 4.0 * a * c))  # the stable form of the root
    return 1.0 / u


def sample_skellam(rng: np.random.Generator, variance: float, size: int) -> npt.NDArray[np.int64]:
    """``size`` draws of the symmetric Skellam distribution of variance ``variance``."""
    _check_positive("variance", variance)
    lam = variance / 2.0
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def conditional_round(
    y: npt.NDArray[Any], *, bound: float, rng: np.random.Generator,
    max_draws: int = MAX_ROUNDING_DRAWS,
) -> npt.NDArray[np.int64]:
    """Stochastic rounding of ``y`` (each coordinate up with probability its fractional part),
    drawn again until the result's L2 norm is at most ``bound``: the sensitivity the
    accountant assumes holds for every output, not only for most.

    After ``max_draws`` misses (probability ``β**max_draws`` with the bound of
    :func:`rounding_norm_bound`) it rounds toward zero, whose norm never exceeds ``y``'s: the
    device never fails on its data, so a failure cannot tell the coordinator anything about
    it. ``bound`` below ``‖y‖`` is the caller's error (``ValueError``)."""
    wide = np.asarray(y, dtype=np.float64)
    limit = math.floor(bound * bound)  # compared with the exact integer sum of squares
    if float(np.dot(wide, wide)) > bound * bound:
        raise ValueError(f"the input's L2 norm exceeds the rounding bound {bound:.6g}")
    floor = np.floor(wide)
    frac = wide - floor
    base = floor.astype(np.int64)
    for _ in range(max_draws):
        r = base + (rng.random(frac.shape) < frac)
        if _squared_norm(r) <= limit:
            return r
    return np.trunc(wide).astype(np.int64)


def _squared_norm(r: npt.NDArray[np.int64]) -> int:
    """``Σ r²`` exactly: in int64 while it cannot overflow, in Python integers beyond."""
    top = int(np.abs(r).max(initial=0))
    if top * top * r.size < 1 << 63:
        return int(np.dot(r, r))
    return sum(int(v) * int(v) for v in r.tolist())


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
