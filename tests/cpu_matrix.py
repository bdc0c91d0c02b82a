"""Rerun the measured tests under several BLAS kernels and thread counts; flag fragile bounds.

    .venv/bin/python -m tests.cpu_matrix            # every ``measured`` test, four set-ups
    .venv/bin/python -m tests.cpu_matrix -k audit   # a subset (pytest's -k expression)

A bound set on one machine must hold on every machine of our kind, where CPUs differ (AMD or
Intel, AVX-512 or AVX2) and so do the BLAS kernels (``OPENBLAS_CORETYPE`` is set on some of
them). One machine cannot be all of them, but it can run the kernels the others would: each
set-up below picks other OpenBLAS kernels (numpy, the Triton interpreter), other torch
vector kernels (``ATEN_CPU_CAPABILITY``), other MKL code paths and another thread count.
Every ``tests.measured.within`` call logs its value; a measurement whose spread across the
set-ups exceeds half its smallest margin, or that broke its bound anywhere, is listed, and
the command exits 1. The table is also written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests.measured import LOG_ENV, THREADS_ENV, margin

ROOT = Path(__file__).resolve().parent.parent

#: Environment variables that pick CPU kernels; each set-up states all of them (None = unset).
#: numpy (and Triton's interpreter) use OpenBLAS; torch uses its own vector kernels (ATen),
#: MKL for BLAS and oneDNN.
KERNEL_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "ATEN_CPU_CAPABILITY", "MKL_CBWR",
                    "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", THREADS_ENV)


@dataclass(frozen=True)
class Setup:
    name: str
    env: dict[str, str | None]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in KERNEL_VARIABLES}
        env.update({k: v for k, v in self.env.items() if v is not None})
        return env


def _setup(name: str, threads: int, **kernels: str) -> Setup:
    return Setup(f"{name}, {threads} thread{'s' * (threads > 1)}",
                 {**dict.fromkeys(KERNEL_VARIABLES), **kernels, THREADS_ENV: str(threads)})


# What machines of our kind differ in, as far as one machine can play them: the newest
# vector units everywhere; AVX2 everywhere (an older Intel or an AMD Zen 2, and the
# OPENBLAS_CORETYPE=Haswell that several of our machines set); and SSE only (no AVX at all:
# the most different rounding a library's fallback path gives). Two thread counts split
# reductions differently.
SETUPS = (
    _setup("avx512", 1, ATEN_CPU_CAPABILITY="avx512", MKL_CBWR="AVX512",
           ONEDNN_MAX_CPU_ISA="AVX512_CORE"),
    _setup("avx2 (Haswell)", 1, OPENBLAS_CORETYPE="Haswell", OPENBLAS_L2_SIZE="512",
           ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2"),
    _setup("avx2 (Haswell)", 2, OPENBLAS_CORETYPE="Haswell", OPENBLAS_L2_SIZE="512",
           ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2"),
    _setup("sse only", 2, OPENBLAS_CORETYPE="Prescott", ATEN_CPU_CAPABILITY="default",
           MKL_CBWR="COMPATIBLE", MKL_ENABLE_INSTRUCTIONS="SSE4_2", ONEDNN_MAX_CPU_ISA="SSE41"),
)


@dataclass(frozen=True)
class Row:
    test: str
    name: str
    values: dict[str, float]  # set-up name -> value
    margin: float  # smallest distance to the bound over the set-ups
    spread: float  # max - min over the set-ups

    @property
    def fragile(self) -> bool:
        return self.margin <= 0 or self.spread > self.margin / 2


def compare(records: dict[str, list[dict[str, object]]]) -> list[Row]:
    """One row per (test, measurement) from each set-up's log records."""
    by_key: dict[tuple[str, str], dict[str, dict[str, object]]] = defaultdict(dict)
    for setup, lines in records.items():
        for record in lines:
            # A test measuring the same name twice (a loop) keeps its first value per set-up.
            by_key[(str(record["test"]), str(record["name"]))].setdefault(setup, record)
    rows = []
    for (test, name), per_setup in sorted(by_key.items()):
        values = {s: float(r["value"]) for s, r in per_setup.items()}  # type: ignore[arg-type]
        margins = [margin(float(r["value"]), r["above"], r["below"])  # type: ignore[arg-type]
                   for r in per_setup.values()]
        rows.append(Row(test, name, values, min(margins),
                        max(values.values()) - min(values.values())))
    return rows


def run_setup(setup: Setup, pytest_args: list[str], log: Path) -> int:
    env = setup.environment(dict(os.environ))
    env[LOG_ENV] = str(log)
    cmd = [sys.executable, "-m", "pytest", "-m", "measured", "-q",
           *pytest_args]
    print(f"[cpu-matrix] {setup.name}: {' '.join(cmd[2:])}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def format_table(rows: list[Row], setups: list[str]) -> str:
    head = "| test | measurement | " + " | ".join(setups) + " | margin | spread | |"
    lines = [head, "|" + "---|" * (len(setups) + 5)]
    for row in rows:
        cells = [f"{row.values[s]:.6g}" if s in row.values else "–" for s in setups]
        flag = "FRAGILE" if row.fragile else ""
        lines.append(f"| {row.test} | {row.name} | " + " | ".join(cells)
                     + f" | {row.margin:.4g} | {row.spread:.4g} | {flag} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default=None, help="pytest -k expression to pick tests")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    pytest_args = ["-k", args.k] if args.k else []
    records: dict[str, list[dict[str, object]]] = {}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, setup in enumerate(SETUPS):
            log = Path(tmp) / f"{i}.jsonl"
            if run_setup(setup, pytest_args, log) not in (0, 5):
                failed.append(setup.name)
            lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
            records[setup.name] = [json.loads(line) for line in lines]
    rows = compare(records)
    if not rows:
        print("[cpu-matrix] no measurement was logged: no test matched", file=sys.stderr)
        return 1
    print(format_table(rows, [s.name for s in SETUPS]))
    if args.out:
        args.out.write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    fragile = [row for row in rows if row.fragile]
    for row in fragile:
        print(f"[cpu-matrix] FRAGILE {row.test} {row.name}: spread {row.spread:.4g} > half "
              f"the margin {row.margin:.4g}", file=sys.stderr)
    if failed:
        print(f"[cpu-matrix] pytest failed under: {failed}", file=sys.stderr)
    return 1 if fragile or failed else 0


if __name__ == "__main__":
    sys.exit(main())
