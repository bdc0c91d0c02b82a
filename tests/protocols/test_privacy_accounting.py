"""Privacy accounting: golden values, independent cross-checks, invariants, the no-torch import."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any, TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.privacy import accounting
from protocols.privacy.accounting import (
    ACCOUNTANTS,
    client_sample_rate,
    epsilon_for_history,
    get_accountant,
    noise_multiplier_for,
    prv_epsilon,
    rdp_epsilon,
)

ROOT = Path(__file__).resolve().parents[2]



class Params(TypedDict):
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float


# Opacus's accountant tests: σ=1.5, q=0.04, 90 epochs = 2250 steps, δ=1e-5.
GOLDEN = Params(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5)
OPACUS_RDP = 7.32911117143  # opacus/tests/accountants_test.py::test_rdp_accountant
# Opacus 1.6 PRVAccountant().get_epsilon(delta=1e-5, eps_error=1e-4) on GOLDEN, measured here
# (52 s, so not re-run in the suite). eps_error=1e-3 gives 6.77013; the default 0.01 gives
# 6.77913 here and 6.777395712150674 in Opacus's own test (both within their 0.01 error band).
OPACUS_PRV_TIGHT = 6.769230985445149
OPACUS_PRV_DEFAULT = 6.777395712150674  # opacus/tests/accountants_test.py, eps_error=0.01


def test_rdp_reproduces_opacus_golden_value() -> None:
    assert rdp_epsilon(**GOLDEN) == pytest.approx(OPACUS_RDP, abs=1e-8)


def test_pld_is_tight_and_matches_opacus_prv() -> None:
    eps = prv_epsilon(**GOLDEN)
    assert abs(eps - OPACUS_PRV_TIGHT) <= 1e-3
    assert abs(eps - OPACUS_PRV_DEFAULT) <= 0.01
    assert eps < rdp_epsilon(**GOLDEN)  # the numerical accountant is the tighter one


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [(0.04, 1.5, 3.9), (0.04, 1.5, 1.1), (0.3, 0.8, 2.5), (0.01, 4.0, 17.0), (0.5, 0.6, 5.5)],
)
def test_rdp_of_one_step_matches_numerical_integration(
    q: float, sigma: float, alpha: float
) -> None:
    """RDP_α = log E_{z~N(0,σ²)}[((1-q) + q·exp((2z-1)/(2σ²)))^α] / (α-1), by quadrature."""
    mp: Any = pytest.importorskip("mpmath")
    mp.mp.dps = 20

    def integrand(z: Any) -> Any:
        return mp.npdf(z, 0, sigma) * ((1 - q) + q * mp.exp((2 * z - 1) / (2 * sigma**2))) ** alpha

    expected = float(mp.log(mp.quad(integrand, [-mp.inf, 0, 0.5, 10 * sigma, 40 * sigma, mp.inf]))
                     / (alpha - 1))
    assert accounting._rdp_one_step(q, sigma, alpha) == pytest.approx(expected, rel=1e-7)


def test_rdp_agrees_with_dp_accounting() -> None:
    """dp_accounting 0.6.0 sums |C(α, i)| at fractional orders, a slightly looser upper bound;
    at integer orders both are exact sums and must agree."""
    dp_accounting = pytest.importorskip("dp_accounting")
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(1.5)), 2250
    )
    default = dp_accounting.rdp.RdpAccountant(orders=list(accounting.DEFAULT_ORDERS))
    theirs = default.compose(event).get_epsilon(1e-5)
    ours = rdp_epsilon(**GOLDEN)
    assert ours <= theirs + 1e-9 and theirs - ours < 1e-3
    integer_orders = [float(a) for a in range(2, 64)]
    exact = dp_accounting.rdp.RdpAccountant(orders=integer_orders)
    expected = exact.compose(event).get_epsilon(1e-5)
    assert rdp_epsilon(**GOLDEN, orders=integer_orders) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("steps", "expected"), [(2000, 1.3562), (2250, 1.416)])
def test_calibration_matches_opacus(steps: int, expected: float) -> None:
    """Opacus get_noise_multiplier(target ε=8, δ=1e-5, q=0.04, accountant='rdp'): its bisection
    stops within 0.01 of the target ε, ours within 1e-4 of σ, so ours may be a little lower."""
    sigma = noise_multiplier_for(target_epsilon=8.0, delta=1e-5, sample_rate=0.04, steps=steps)
    assert expected - 5e-4 < sigma < expected + 1e-4


def test_history_composes_and_merges() -> None:
    single = rdp_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=30, delta=1e-5)
    split = [(1.0, 0.1, 10), (1.0, 0.1, 20)]
    assert epsilon_for_history(split, delta=1e-5, accountant="rdp") == pytest.approx(single)
    mixed = [(3.0, 0.1, 10), (2.5, 0.2, 20)]
    for name in ACCOUNTANTS:
        both = epsilon_for_history(mixed, delta=1e-5, accountant=name)
        for entry in mixed:
            assert both > epsilon_for_history([entry], delta=1e-5, accountant=name)
    assert epsilon_for_history(mixed, delta=1e-5, accountant="pld") < epsilon_for_history(
        mixed, delta=1e-5, accountant="rdp"
    )


def test_heterogeneous_history_agrees_with_dp_accounting_rdp() -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    mixed = [(1.0, 0.1, 10), (2.0, 0.2, 20), (0.8, 0.05, 7)]
    composed = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n
        ) for s, q, n in mixed
    ])
    rdp = dp_accounting.rdp.RdpAccountant(orders=list(accounting.DEFAULT_ORDERS))
    theirs = rdp.compose(composed).get_epsilon(1e-5)
    ours = epsilon_for_history(mixed, delta=1e-5, accountant="rdp")
    assert ours <= theirs + 1e-9 and theirs - ours < 1e-3


@pytest.mark.parametrize("name", ["rdp", "pld"])
def test_degenerate_histories(name: str) -> None:
    assert epsilon_for_history([], delta=1e-5, accountant=name) == 0.0
    assert epsilon_for_history([(1.0, 0.1, 0)], delta=1e-5, accountant=name) == 0.0
    assert epsilon_for_history([(1.0, 0.0, 5)], delta=1e-5, accountant=name) == 0.0
    assert epsilon_for_history([(0.0, 0.1, 1)], delta=1e-5, accountant=name) == math.inf


def test_unknown_accountant_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown accountant 'prv'; valid accountants: \['pld', "
                                         r"'rdp', 'rdp-general'\]"):
        get_accountant("prv")
    with pytest.raises(TypeError):
        ACCOUNTANTS["mine"] = ACCOUNTANTS["rdp"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 1.5}, r"sample_rate = 1.5: must be in \[0, 1\]"),
        ({"noise_multiplier": -1.0}, r"noise_multiplier = -1.0: must be finite and >= 0"),
        ({"noise_multiplier": math.nan}, r"noise_multiplier = nan: must be finite and >= 0"),
        ({"steps": 2.0}, r"steps = 2.0: must be an int >= 0"),
        ({"steps": True}, r"steps = True: must be an int >= 0"),
        ({"delta": 0.0}, r"delta = 0.0: must be in \(0, 1\)"),
        ({"delta": 1.0}, r"delta = 1.0: must be in \(0, 1\)"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, Any], message: str) -> None:
    params: dict[str, Any] = {**GOLDEN, "steps": 10, **kwargs}
    for epsilon in (rdp_epsilon, prv_epsilon):
        with pytest.raises(ValueError, match=message):
            epsilon(**params)


def test_client_sample_rate() -> None:
    assert client_sample_rate(clients_per_round=10, num_clients=100) == 0.1
    with pytest.raises(ValueError, match=r"clients_per_round = 11: must be in \[1, num_clients"):
        client_sample_rate(clients_per_round=11, num_clients=10)


def test_unreachable_target_is_refused() -> None:
    with pytest.raises(ValueError, match="out of reach"):
        noise_multiplier_for(target_epsilon=0.05, delta=1e-5, sample_rate=0.1, steps=50)


def test_log_erfc_matches_scipy_beyond_underflow() -> None:
    special = pytest.importorskip("scipy.special")
    for x in (-3.0, 0.0, 1.0, 19.9, 20.0, 25.0, 40.0, 1e3):
        expected = math.log(2) + float(special.log_ndtr(-x * math.sqrt(2)))
        assert accounting._log_erfc(x) == pytest.approx(expected, rel=1e-12)


SIGMAS = st.floats(0.7, 5.0)
RATES = st.floats(1e-3, 0.1)
STEPS = st.integers(1, 500)


@settings(max_examples=15, deadline=None)
@given(sigma=SIGMAS, q=RATES, steps=STEPS, extra=st.integers(1, 500))
def test_epsilon_grows_with_steps(sigma: float, q: float, steps: int, extra: int) -> None:
    eps = rdp_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    more = rdp_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps + extra, delta=1e-5)
    assert more >= eps


@settings(max_examples=15, deadline=None)
@given(sigma=SIGMAS, q=RATES, steps=STEPS, factor=st.floats(1.01, 3.0))
def test_epsilon_grows_with_sample_rate(sigma: float, q: float, steps: int, factor: float) -> None:
    eps = rdp_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    more = rdp_epsilon(noise_multiplier=sigma, sample_rate=min(1.0, q * factor), steps=steps,
                       delta=1e-5)
    assert more >= eps


@settings(max_examples=15, deadline=None)
@given(sigma=SIGMAS, q=RATES, steps=STEPS, factor=st.floats(1.01, 3.0))
def test_epsilon_shrinks_with_noise(sigma: float, q: float, steps: int, factor: float) -> None:
    eps = rdp_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    less = rdp_epsilon(noise_multiplier=sigma * factor, sample_rate=q, steps=steps, delta=1e-5)
    assert less <= eps


@settings(max_examples=5, deadline=None)
@given(
    target=st.floats(0.5, 4.0),
    q=st.sampled_from([0.01, 0.02, 0.05]),
    steps=st.integers(50, 500),
    delta=st.sampled_from([1e-5, 1e-6]),
)
def test_calibration_never_overshoots(target: float, q: float, steps: int, delta: float) -> None:
    sigma = noise_multiplier_for(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    assert rdp_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta) <= target
    assert rdp_epsilon(noise_multiplier=0.99 * sigma, sample_rate=q, steps=steps, delta=delta) > (
        target
    )


def test_pld_calibration_never_overshoots() -> None:
    delta, q, steps = 1e-5, 0.05, 500  # σ ≈ 8: the PLD is slow to build at small σ
    sigma = noise_multiplier_for(
        target_epsilon=0.5, delta=delta, sample_rate=q, steps=steps, accountant="pld", rtol=5e-3
    )
    assert prv_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta) <= 0.5
    assert prv_epsilon(noise_multiplier=sigma * 0.99, sample_rate=q, steps=steps, delta=delta) > 0.5
    # the tight accountant needs less noise than RDP for the same guarantee
    assert sigma < noise_multiplier_for(target_epsilon=0.5, delta=delta, sample_rate=q, steps=steps)


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "opacus"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_privacy_modules_work_without_torch() -> None:
    code = BLOCK_TORCH + (
        "import protocols.privacy, protocols.privacy.accounting, protocols.privacy.ledger\n"
        "from protocols.privacy import rdp_epsilon, prv_epsilon\n"
        "kw = dict(noise_multiplier=3.0, sample_rate=0.1, steps=3, delta=1e-5)\n"
        "assert rdp_epsilon(**kw) > 0 and prv_epsilon(**kw) > 0\n"
        "assert not {'torch', 'opacus'} & set(sys.modules)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_pld_refuses_a_noise_multiplier_whose_grid_would_not_fit_in_memory() -> None:
    """σ = 1e-3 would make dp_accounting allocate a ~1e10-point grid (tens of GB): refused
    at once, naming the value and the way out; RDP still answers."""
    from protocols.privacy.accounting import MAX_PLD_POINTS, pld_grid_points, prv_epsilon

    with pytest.raises(ValueError, match=r"noise_multiplier = 0\.001 is too small for the "
                                         r"'pld' accountant.*use accountant 'rdp'"):
        prv_epsilon(noise_multiplier=1e-3, sample_rate=0.1, steps=10, delta=1e-5)
    assert pld_grid_points(1e-3, 1e-4) > 100 * MAX_PLD_POINTS
    assert pld_grid_points(0.5, 1e-4) < MAX_PLD_POINTS / 10  # the usual range is untouched
    assert math.isfinite(rdp_epsilon(noise_multiplier=1e-3, sample_rate=0.1, steps=10,
                                     delta=1e-5))
