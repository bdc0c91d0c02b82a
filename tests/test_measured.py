"""The measured-bound helper and the CPU matrix's comparison: what they log and what they flag."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import cpu_matrix, measured


@pytest.fixture(autouse=True)
def _own_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """These tests break bounds on purpose: their records never reach the matrix's log."""
    log = tmp_path / "m.jsonl"
    monkeypatch.setenv(measured.LOG_ENV, str(log))
    return log


@pytest.mark.measured
def test_within_asserts_and_logs_each_value(_own_log: Path) -> None:
    log = _own_log
    measured.within("recall", np.float32(0.5), above=0.25)
    with pytest.raises(AssertionError, match=r"loss drop = 0.01 is outside its bound"):
        measured.within("loss drop", 0.01, above=0.015)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["name"], r["value"], r["above"], r["below"]) for r in records] == [
        ("recall", 0.5, 0.25, None), ("loss drop", 0.01, 0.015, None)]
    assert records[0]["test"].endswith("test_within_asserts_and_logs_each_value")
    with pytest.raises(ValueError, match="give a bound"):
        measured.within("nothing", 1.0)


def test_within_refuses_a_test_without_the_marker() -> None:
    with pytest.raises(AssertionError, match=r"lacks @pytest\.mark\.measured"):
        measured.within("x", 1.0, below=2.0)


@pytest.mark.measured
def test_close_measures_the_worst_element_in_tolerances() -> None:
    measured.close("ok", np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6]), rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match=r"worst error / tolerance = 2\.0"):
        measured.close("off", np.array([0.0]), np.array([2e-5]), rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match=r"shape \(2,\) != \(3,\)"):
        measured.close("shape", np.zeros(2), np.zeros(3), rtol=0, atol=1)


def test_margin_is_the_distance_to_the_nearer_bound() -> None:
    assert measured.margin(0.5, 0.25, None) == 0.25
    assert measured.margin(0.5, 0.0, 0.6) == pytest.approx(0.1)
    assert measured.margin(0.25, 0.25, None) == 0.0  # issue 20: 0.25 > 0.25 is a failure


def _record(test: str, value: float, above: float | None = None,
            below: float | None = None) -> dict[str, object]:
    return {"test": test, "name": "m", "value": value, "above": above, "below": below}


def test_matrix_flags_a_value_that_moves_by_half_its_margin() -> None:
    rows = cpu_matrix.compare({
        "a": [_record("steady", 0.50, above=0.25), _record("moving", 0.50, above=0.25),
              _record("broken", 0.30, above=0.25)],
        "b": [_record("steady", 0.52, above=0.25), _record("moving", 0.30, above=0.25),
              _record("broken", 0.25, above=0.25)],
    })
    by_test = {row.test: row for row in rows}
    assert by_test["steady"].margin == pytest.approx(0.25)
    assert by_test["steady"].spread == pytest.approx(0.02) and not by_test["steady"].fragile
    # moved 0.2 while the nearer set-up was only 0.05 above its bound
    assert by_test["moving"].fragile and by_test["moving"].margin == pytest.approx(0.05)
    assert by_test["broken"].fragile  # on its bound under one set-up
    table = cpu_matrix.format_table(rows, ["a", "b"])
    assert "| moving | m | 0.5 | 0.3 | 0.05 | 0.2 | FRAGILE |" in table


def test_each_setup_states_every_kernel_variable() -> None:
    base = {"PATH": "/bin", "OPENBLAS_CORETYPE": "Haswell", "MKL_CBWR": "AVX2"}
    for setup in cpu_matrix.SETUPS:
        assert set(setup.env) == set(cpu_matrix.KERNEL_VARIABLES)
        env = setup.environment(base)
        assert env["PATH"] == "/bin"
        assert env.get("OPENBLAS_CORETYPE") == setup.env["OPENBLAS_CORETYPE"]
        assert env[measured.THREADS_ENV] in {"1", "2"}
    assert len({s.name for s in cpu_matrix.SETUPS}) == len(cpu_matrix.SETUPS)
