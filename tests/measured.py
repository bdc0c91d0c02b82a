"""Bounds on measured quantities: asserted in every run, logged for the CPU matrix.

A test that bounds a number which comes out of BLAS, ONNX Runtime, a random generator or a
training loop (an attack's recall, a loss drop, a noise statistic, a perplexity) states its
bound through :func:`within` instead of a bare ``assert``. The check is the same; in
addition, with ``FEDTUNE_MEASUREMENTS`` naming a file, every value is appended there as one
JSON line, so ``python -m tests.cpu_matrix`` can rerun those tests under other BLAS core
types and thread counts and list each value that moves by more than half its margin — a
bound that would hinge on one CPU's rounding (issue 20: a recall of exactly 0.25 against a
bound of ``> 0.25`` on one AMD machine, ~0.5 on the machine where the bound was set).

Such tests carry the ``measured`` marker (``within`` refuses to run in a test without it, so
the matrix cannot miss one) and build their torch work with :data:`THREADS` threads, which
the matrix varies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Where :func:`within` appends its records (unset: nothing is logged).
LOG_ENV = "FEDTUNE_MEASUREMENTS"
#: Torch intra-op threads for measured tests; the CPU matrix runs them at 1 and 2.
THREADS_ENV = "FEDTUNE_TEST_THREADS"
THREADS = int(os.environ.get(THREADS_ENV, "1"))

_current = {"test": "", "marked": False}


def enter_test(nodeid: str, *, marked: bool) -> None:
    """Called by ``conftest.py`` before each test: which test runs, and whether it is marked."""
    _current["test"] = nodeid
    _current["marked"] = marked


def margin(value: float, above: float | None, below: float | None) -> float:
    """Distance from ``value`` to the nearer bound (negative when the bound is broken)."""
    gaps = [value - above if above is not None else float("inf"),
            below - value if below is not None else float("inf")]
    return min(gaps)


def within(name: str, value: float, *, above: float | None = None,
           below: float | None = None) -> None:
    """Assert ``above < value < below`` (either side optional) and log the measurement.

    ``name`` tells apart several measurements in one test; ``above``/``below`` may themselves
    be measured in the same run (a baseline), and are logged with the value.
    """
    if above is None and below is None:
        raise ValueError(f"{name}: give a bound (above= and/or below=)")
    if not _current["marked"]:
        raise AssertionError(f"{_current['test']} bounds the measured quantity {name!r} but "
                             "lacks @pytest.mark.measured, so tests/cpu_matrix.py would skip it")
    value = float(value)
    above = None if above is None else float(above)
    below = None if below is None else float(below)
    log = os.environ.get(LOG_ENV)
    if log:
        record = {"test": _current["test"], "name": name, "value": value,
                  "above": above, "below": below}
        with Path(log).open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
    assert margin(value, above, below) > 0, (
        f"{name} = {value!r} is outside its bound (above {above!r}, below {below!r})")


def close(name: str, got: object, want: object, *, rtol: float, atol: float) -> None:
    """``assert_allclose`` as a measured bound: the worst element's error in units of its
    tolerance ``atol + rtol * |want|`` must stay below 1 (logged, so the matrix sees how
    near a tight float comparison runs to its tolerance on each set of kernels)."""
    import numpy as np

    def as_array(x: object) -> np.ndarray:
        detach = getattr(x, "detach", None)
        return np.asarray(detach().cpu().numpy() if detach else x, dtype=np.float64)

    a, b = as_array(got), as_array(want)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
    within(f"{name}: worst error / tolerance",
           float(np.max(np.abs(a - b) / (atol + rtol * np.abs(b)), initial=0.0)), below=1.0)
