"""What the comparison benchmarks over a preset share: one simulation per named variant in
one runs folder (``<prefix>-<variant>``), the options that place them, and telling which
variant a finished (or ``.partial``) run folder belongs to when it is re-analysed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def add_run_options(parser: argparse.ArgumentParser, *, preset: Path, prefix: str,
                    variant: str) -> None:
    """``--preset``, ``--set``, ``--runs-dir``, ``--prefix``, ``--cache-dir`` and
    ``--from-runs`` (finished runs named ``<prefix>-<variant>``)."""
    parser.add_argument("--preset", type=Path, default=preset)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any further config override, applied to every run")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default=prefix)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--from-runs", nargs="+", type=Path, metavar="RUN",
                        help=f"analyse finished runs (named <prefix>-<{variant}>) instead")


class NamedRuns:
    """Simulations of one benchmark: the preset and overrides of ``args``, one cache, runs
    written as ``<args.runs_dir>/<args.prefix>-<name>``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from protocols.cache_dir import default_cache_dir
        from protocols.environment import configure_environment

        configure_environment()
        self.args = args
        self.cache = args.cache_dir or default_cache_dir()

    def inputs(self, overrides: list[str]) -> Any:
        """The checked inputs of the preset with ``overrides`` (which place ``--set``)."""
        from protocols.config_file import load_config
        from simulations.runner import check_inputs

        return check_inputs(load_config(self.args.preset, overrides), self.cache)

    def run(self, name: str, inputs: Any) -> Path:
        """Run the simulation; return its finished folder."""
        from simulations.runner import run_federated

        out = run_federated(inputs, self.args.runs_dir, name=f"{self.args.prefix}-{name}")
        print(f"finished {out}", file=sys.stderr)
        return out


def variant_of(run: Path, names: Iterable[str]) -> str:
    """The variant a run folder was made by: the longest of ``names`` its name ends with
    (``secagg+`` before ``secagg``), or the folder's name."""
    name = run.name.removesuffix(".partial")
    return next((n for n in sorted(names, key=len, reverse=True) if name.endswith(n)), name)


@dataclass(frozen=True)
class Variant:
    """One run of a comparison: its name, what it is, and its overrides of the preset."""

    name: str
    what: str
    overrides: tuple[str, ...]


def chosen_runs(args: argparse.Namespace, parser: argparse.ArgumentParser,
                variants: dict[str, Variant], common: list[str]) -> list[Path]:
    """The finished runs to analyse: ``--from-runs``, else one simulation per name of
    ``args.variants`` (comma-separated) with ``common`` then the variant's overrides."""
    if args.from_runs:
        return list(args.from_runs)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in variants]
    if unknown or not names:
        parser.error(f"unknown run(s) {unknown}; choose from {list(variants)}")
    runs = NamedRuns(args)
    return [runs.run(name, runs.inputs([*common, *args.set, *variants[name].overrides]))
            for name in names]


def read_runs(runs: list[Path], names: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Each run's ``metrics.jsonl`` rows by variant; exits naming the runs that have no
    trained round."""
    from server.metrics_log import read_metrics

    metrics = {variant_of(r, names): read_metrics(r) for r in runs}
    empty = [name for name, rows in metrics.items() if len(rows) < 2]
    if empty:
        raise SystemExit(f"no trained round in the runs of {empty}: did they finish?")
    return metrics


def perplexity_rounds(metrics: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round the runs share: ``{"round": n, <run>: held-out perplexity, ...}``."""
    rounds = min(len(rows) for rows in metrics.values())
    first = next(iter(metrics.values()))
    return [{"round": first[i]["round"],
             **{name: rows[i].get("perplexity") for name, rows in metrics.items()}}
            for i in range(rounds)]


def render_rounds(table: list[dict[str, Any]], names: list[str], width: int) -> list[str]:
    """The per-round perplexity table, one column per run (at least ``width`` wide)."""
    widths = [max(width, len(n)) for n in names]
    lines = [f"{'round':>5} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))]
    for r in table:
        lines.append(f"{r['round']:>5} " + " ".join(
            f"{cell(r[n], '.2f'):>{w}}" for n, w in zip(names, widths, strict=True)))
    return lines


def save_result(result: dict[str, Any], runs: list[Path], stem: str, title: str) -> Path:
    """``<stem>.json`` and the perplexity plot ``<stem>.png`` beside the runs; returns the
    plot's path."""
    import json

    out = runs[0].parent / stem
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    names = [s["run"] for s in result["summary"]]
    plot_perplexity({n: [r[n] for r in result["rounds"]] for n in names},
                    [r["round"] for r in result["rounds"]], title, out.with_suffix(".png"))
    return out.with_suffix(".png")


def cell(value: float | None, fmt: str) -> str:
    """A table cell: ``value`` in ``fmt``, or ``-`` when a run has no such figure."""
    return "-" if value is None else format(value, fmt)


def plot_perplexity(series: dict[str, list[float]], rounds: list[int], title: str,
                    path: Path) -> None:
    """Held-out perplexity per round of each run, one line each (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, values in series.items():
        ax.plot(rounds, values, "o-", ms=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
