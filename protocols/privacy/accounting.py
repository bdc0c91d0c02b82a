"""Privacy accounting for the subsampled Gaussian mechanism: pure functions, no state.

Client-level DP in federated rounds (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", ICLR): each round the coordinator samples clients with rate
``q = clients_per_round / num_clients``, clips every client's update to L2 norm ``C`` and adds
Gaussian noise of std ``σ·C`` to the sum (``σ·C/m`` on the unweighted mean of ``m`` updates,
as Flower's DP wrappers do). One round is then one step of the subsampled Gaussian mechanism
with ``sample_rate = q`` and ``noise_multiplier = σ``, neighbouring datasets differing by one
client's data (add/remove). The analysis assumes Poisson sampling of clients; sampling a fixed
number without replacement is the usual approximation of it.

The RDP analysis is written out here from the papers (stdlib ``math`` only) and reproduces
Opacus's golden value; the tight PLD accountant is Google's ``dp_accounting``, imported lazily
so that the RDP path and the ledger import on a device that has only the base install.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

#: One composition entry: (noise_multiplier, sample_rate, steps), as in Opacus's history.
HistoryEntry = tuple[float, float, int]

#: Opacus's ``DEFAULT_ALPHAS``: the Rényi orders the RDP bound is optimised over.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)

#: The integer orders of the mechanism-agnostic bound (``'rdp-general'``): Zhu & Wang's
#: subsampling theorem holds at integer orders only.
INTEGER_ORDERS: tuple[float, ...] = tuple(float(a) for a in range(2, 257))

#: PLD grid step of the privacy loss (dp_accounting's default); 1e-3 is ~5x faster, ~1e-3 looser.
PLD_VALUE_DISCRETIZATION = 1e-4

_MAX_SERIES_TERMS = 100_000  # a fractional order whose series does not converge is unused
_MAX_NOISE_MULTIPLIER = 1e6
_LOG2 = math.log(2)


class HistoryAccountant(Protocol):
    def __call__(self, history: Sequence[HistoryEntry], *, delta: float) -> float: ...


def client_sample_rate(*, clients_per_round: int, num_clients: int) -> float:
    """Sampling rate of one federated round: ``clients_per_round / num_clients``."""
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round = {clients_per_round!r}: must be in [1, num_clients = "
            f"{num_clients!r}]"
        )
    return clients_per_round / num_clients


def check_step(*, noise_multiplier: float, sample_rate: float, steps: int) -> None:
    """Refuse a σ, q or step count no accountant can take; the message names the value."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier = {noise_multiplier!r}: must be finite and >= 0")
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate = {sample_rate!r}: must be in [0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps = {steps!r}: must be an int >= 0")


def check_delta(delta: float) -> None:
    """Refuse a δ outside (0, 1)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta = {delta!r}: must be in (0, 1)")


def _merge(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Check every entry and add up the steps of identical (σ, q) pairs (composition commutes)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        check_step(noise_multiplier=sigma, sample_rate=q, steps=n)
        if n > 0 and q > 0:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


# --- RDP (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
# Mechanism", arXiv:1908.10530) -------------------------------------------------------------


def _log_sum(logs: Sequence[float], signs: Sequence[float]) -> float:
    """log(Σ sign·e^log), summed exactly (``math.fsum``) after shifting by the largest term."""
    top = max(logs)
    total = math.fsum(sg * math.exp(lg - top) for sg, lg in zip(signs, logs, strict=True))
    return top + math.log(total) if total > 0 else math.inf  # A_α >= 1: never <= 0 in theory


def _log_erfc(x: float) -> float:
    """log(erfc(x)); an asymptotic series (Abramowitz & Stegun 7.1.23) where erfc underflows."""
    if x < 20.0:
        return math.log(math.erfc(x))
    y = 1.0 / (x * x)
    series = 1.0 - y / 2 + 3 * y**2 / 4 - 15 * y**3 / 8 + 105 * y**4 / 16
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_α for integer α (Sec. 3.2): Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2σ²))."""
    logs = [math.log(math.comb(alpha, k)) + k * math.log(q) + (alpha - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma**2) for k in range(alpha + 1)]
    return _log_sum(logs, [1.0] * len(logs))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α (Sec. 3.3): two signed series, split at z0 where μ0 = μ1·q/(1-q).

    Returns +inf (the order is then unused) if the series does not converge.
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq, two_var, scale = math.log(q), math.log1p(-q), 2 * sigma**2, math.sqrt(2) * sigma
    floor_alpha = math.floor(alpha)
    logs: list[float] = []  # log|term| of both series
    signs: list[float] = []  # sign of C(α, i): alternates once i > α
    coef = 0.0  # log|C(α, i)|, updated term by term
    for i in range(_MAX_SERIES_TERMS):
        j = alpha - i
        s0 = (coef + i * log_q + j * log_1mq + (i * i - i) / two_var - _LOG2
              + _log_erfc((i - z0) / scale))
        s1 = (coef + j * log_q + i * log_1mq + (j * j - j) / two_var - _LOG2
              + _log_erfc((z0 - j) / scale))
        sign = -1.0 if i > alpha and (i - floor_alpha) % 2 == 0 else 1.0
        logs += (s0, s1)
        signs += (sign, sign)
        if i > alpha and max(s0, s1) < -30:  # A_α >= 1, so this is relative to the sum
            return _log_sum(logs, signs)
        coef += math.log(abs(j)) - math.log(i + 1)
    return math.inf


def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    """RDP of order α of one subsampled Gaussian step: log(A_α) / (α - 1)."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1:
        return alpha / (2 * sigma**2)
    log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() else _log_a_frac(
        q, sigma, alpha
    )
    return log_a / (alpha - 1)


def _log_general_int(q: float, sigma: float, alpha: int) -> float:
    """log of Zhu & Wang's general bound (2019, "Poisson Subsampled Rényi Differential
    Privacy", ICML, Thm. 9) for a mechanism whose RDP is at most ``ε(ℓ) = ℓ/(2σ²)``::

        (1-q)^(α-1) (αq - q + 1) + C(α,2) q² (1-q)^(α-2) e^ε(2)
                                 + 3 Σ_{ℓ=3..α} C(α,ℓ) q^ℓ (1-q)^(α-ℓ) e^((ℓ-1) ε(ℓ))

    It holds for *any* such mechanism (add/remove neighbours) and is increasing in every
    ``ε(ℓ)``; the factor 3 is the price of not knowing it is Gaussian."""
    logs = [(alpha - 1) * math.log1p(-q) + math.log1p((alpha - 1) * q)]
    for ell in range(2, alpha + 1):
        logs.append((math.log(3.0) if ell >= 3 else 0.0) + math.log(math.comb(alpha, ell))
                    + ell * math.log(q) + (alpha - ell) * math.log1p(-q)
                    + (ell - 1) * ell / (2 * sigma**2))
    return _log_sum(logs, [1.0] * len(logs))


def _rdp_general_step(q: float, sigma: float, alpha: float) -> float:
    """RDP of order α (an integer) of one subsampled step of *any* mechanism whose own RDP is at
    most the Gaussian's at ``σ`` — the Skellam rounds of quantized secure aggregation
    (:mod:`protocols.privacy.skellam`): the general bound, or the unsampled one if smaller."""
    if not float(alpha).is_integer():
        raise ValueError(f"the general subsampling bound needs integer orders, got {alpha!r}")
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    unsampled = alpha / (2 * sigma**2)
    if q == 1:
        return unsampled
    return min(_log_general_int(q, sigma, int(alpha)) / (alpha - 1), unsampled)


def _rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """Best ε over the orders, by Balle et al. 2020 ("Hypothesis Testing Interpretations and
    Rényi Differential Privacy", AISTATS; Thm. 21 of arXiv:1905.09982):
    ε = RDP(α) + log((α-1)/α) - (log δ + log α) / (α-1), clamped at 0."""
    best = math.inf
    for alpha, r in zip(orders, rdp, strict=True):
        eps = r + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return max(best, 0.0)


def _rdp_history(
    history: Sequence[HistoryEntry], *, delta: float, orders: Sequence[float] | None = None,
    general: bool = False,
) -> float:
    check_delta(delta)
    orders = DEFAULT_ORDERS if orders is None else tuple(orders)
    if not orders or min(orders) <= 1:
        raise ValueError(f"orders = {orders!r}: must be non-empty, every order > 1")
    merged = _merge(history)
    if not merged:
        return 0.0
    per_entry = [(n, _rdp_curve(q, sigma, orders, general)) for sigma, q, n in merged]
    rdp = [sum(n * curve[k] for n, curve in per_entry) for k in range(len(orders))]
    return _rdp_to_epsilon(orders, rdp, delta)


@functools.lru_cache(maxsize=256)
def _rdp_curve(q: float, sigma: float, orders: tuple[float, ...],
               general: bool = False) -> tuple[float, ...]:
    """RDP of one step at every order; cached, as a ledger asks again every round."""
    step = _rdp_general_step if general else _rdp_one_step
    return tuple(step(q, sigma, alpha) for alpha in orders)


def rdp_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    orders: Sequence[float] | None = None,
) -> float:
    """ε of ``steps`` subsampled Gaussian steps by Rényi DP (Mironov et al. 2019), converted to
    (ε, δ)-DP with Balle et al. 2020, Thm. 21; the orders default to Opacus's ``DEFAULT_ALPHAS``.

    σ=1.5, q=0.04, 2250 steps, δ=1e-5 gives 7.32911117143 (Opacus's ``RDPAccountant``).
    """
    return _rdp_history([(noise_multiplier, sample_rate, steps)], delta=delta, orders=orders)


# --- PLD (Doroshenko et al. 2022, "Connect the Dots: Tighter Discrete Approximations of
# Privacy Loss Distributions", PETS; Google's dp_accounting) --------------------------------


#: The most grid points one step's PLD may need by :func:`pld_grid_points` (an over-estimate by
#: ~2x: measured, dp_accounting builds 4.0e6 points in 34 s at σ = 0.05, q = 0.5, where the
#: estimate says 8e6). σ ≈ 0.023 reaches it at the default discretisation; σ = 1e-3 would
#: need ~1e10 points (tens of GB).
MAX_PLD_POINTS = 20_000_000


def pld_grid_points(sigma: float, value_discretization_interval: float) -> float:
    """About how many points one step's PLD needs: the privacy loss of N(0, σ²) vs N(1, σ²)
    over the ±10σ the distribution keeps, divided by the grid step."""
    return (1.0 / sigma**2 + 20.0 / sigma) / value_discretization_interval


def check_pld_size(sigma: float, value_discretization_interval: float) -> None:
    """Refuse a σ whose PLD would not fit in memory, before anything is allocated."""
    points = pld_grid_points(sigma, value_discretization_interval)
    if points > MAX_PLD_POINTS:
        raise ValueError(
            f"noise_multiplier = {sigma!r} is too small for the 'pld' accountant: its privacy "
            f"loss grid would need ~{points:.1e} points (~{points * 8 / 2**30:.0f} GB at "
            f"discretisation {value_discretization_interval:g}); use accountant 'rdp' (exact "
            "arithmetic at any sigma) or a larger noise multiplier")


@functools.lru_cache(maxsize=32)
def _subsampled_gaussian_pld(sigma: float, q: float, value_discretization_interval: float) -> Any:
    """One step's PLD; cached, as a ledger asks again every round (it costs ~1 s at σ ≈ 1)."""
    check_pld_size(sigma, value_discretization_interval)
    try:
        from dp_accounting.pld import privacy_loss_distribution
    except ImportError as err:  # pragma: no cover - depends on the install
        msg = "the 'pld' accountant needs dp-accounting==0.6.0; or use accountant='rdp'"
        raise ImportError(msg) from err
    return privacy_loss_distribution.from_gaussian_mechanism(  # add/remove one, pessimistic
        standard_deviation=sigma, sampling_prob=q,
        value_discretization_interval=value_discretization_interval,
    )


def _pld_history(
    history: Sequence[HistoryEntry], *, delta: float,
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION,
) -> float:
    check_delta(delta)
    merged = _merge(history)
    if not merged:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in merged):
        return math.inf
    plds = [
        _subsampled_gaussian_pld(sigma, q, value_discretization_interval).self_compose(n)
        for sigma, q, n in merged
    ]
    total = functools.reduce(lambda a, b: a.compose(b), plds)
    return max(float(total.get_epsilon_for_delta(delta)), 0.0)


def prv_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION,
) -> float:
    """ε of ``steps`` subsampled Gaussian steps by a tight numerical accountant: the privacy loss
    distribution (PLD) of ``dp_accounting``, pessimistic discretisation (an upper bound), the
    same family as Opacus's PRV accountant (Gopi et al. 2021).

    σ=1.5, q=0.04, 2250 steps, δ=1e-5 gives 6.76879 (Opacus PRV, ``eps_error=1e-4``: 6.76923).
    """
    return _pld_history(
        [(noise_multiplier, sample_rate, steps)], delta=delta,
        value_discretization_interval=value_discretization_interval,
    )


ACCOUNTANTS: Mapping[str, HistoryAccountant] = MappingProxyType(
    {"rdp": _rdp_history, "pld": _pld_history,
     "rdp-general": functools.partial(_rdp_history, orders=INTEGER_ORDERS, general=True)}
)


def get_accountant(name: str) -> HistoryAccountant:
    """The accountant ``(history, *, delta) -> ε`` registered as ``name``."""
    try:
        return ACCOUNTANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown accountant {name!r}; valid accountants: {sorted(ACCOUNTANTS)}"
        ) from None


def epsilon_for_history(
    history: Sequence[HistoryEntry], *, delta: float, accountant: str
) -> float:
    """ε after composing every ``(noise_multiplier, sample_rate, steps)`` entry of ``history``."""
    return get_accountant(accountant)(history, delta=delta)


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str = "rdp", rtol: float = 1e-4,
) -> float:
    """The smallest σ (to relative tolerance ``rtol``) whose ε is at most ``target_epsilon``.

    Bisection keeps ``hi`` with ε(hi) ≤ target and returns it, so it never overshoots. A tight
    accountant starts from the RDP answer (an upper bound on its σ): its small-σ steps are slow.
    """
    def eps_of(sigma: float) -> float:
        history = [(sigma, sample_rate, steps)]
        return epsilon_for_history(history, delta=delta, accountant=accountant)

    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon = {target_epsilon!r}: must be finite and > 0")
    check_step(noise_multiplier=0.0, sample_rate=sample_rate, steps=steps)
    if sample_rate == 0 or steps == 0:
        raise ValueError("nothing to calibrate: sample_rate and steps must be > 0")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol = {rtol!r}: must be in (0, 1)")
    get_accountant(accountant)
    hi, factor = (1.0, 2.0) if accountant.startswith("rdp") else (noise_multiplier_for(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, rtol=1e-2
    ), 1.25)
    lo = 0.0  # bracket: ε(lo) > target >= ε(hi); ε grows without bound as σ -> 0 (q > 0)
    while eps_of(hi) > target_epsilon:
        lo, hi = hi, hi * factor
        if hi > _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target_epsilon = {target_epsilon!r} is out of reach at delta = {delta!r} "
                f"(noise_multiplier > {_MAX_NOISE_MULTIPLIER:g}); raise the target or delta"
            )
    if lo == 0.0:
        lo = hi / factor
        while lo > 1e-6 and eps_of(lo) <= target_epsilon:
            lo, hi = lo / factor, lo
    while hi - lo > rtol * hi:  # hi is only ever set to a σ whose ε was checked <= target
        mid = (lo + hi) / 2
        if eps_of(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
