"""Benchmark: where a round's time and bytes go in the default federated run.

    python -m simulations.bench.round_timing                 # runs the default simulation
    python -m simulations.bench.round_timing --from-run DIR  # analyses a finished run

Per round: wall time split into client training (the slowest of the clients training in
parallel, as each reports it), aggregation (decode + validate + average on the
coordinator), central evaluation, and framework overhead (the rest of the time between
sending the instructions and having every reply: Flower messaging, Ray scheduling,
(de)serialisation, and on round 1 the actors' start-up and model load). Bytes are the
serialised adapter payloads per client. Ratios are against the client training time of the
same round, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics


def analyse(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    out = []
    for row in rows:
        if row["round"] == 0 or "round_s" not in row:
            continue
        train = max(row["client_train_s"]) if row["client_train_s"] else 0.0
        clients = max(row["clients"], 1)
        sampled = max(row["sampled"], 1)
        out.append(
            {
                "round": row["round"],
                "round_s": row["round_s"] + row["eval_s"],
                "train_s": train,
                "aggregate_s": row["aggregate_s"],
                "eval_s": row["eval_s"],
                "overhead_s": row["clients_s"] - train,
                "up_bytes_per_client": row["bytes_up"] / clients,
                "down_bytes_per_client": row["bytes_down"] / sampled,
            }
        )
    return out


def render(table: list[dict[str, float]]) -> str:
    head = (
        f"{'round':>5} {'wall s':>8} {'train s':>8} {'aggr s':>7} {'eval s':>7} "
        f"{'overhead s':>10} {'overhead/train':>14} {'up KB/client':>13} "
        f"{'down KB/client':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in table:
        ratio = r["overhead_s"] / r["train_s"] if r["train_s"] else float("nan")
        lines.append(
            f"{r['round']:>5.0f} {r['round_s']:>8.1f} {r['train_s']:>8.1f} "
            f"{r['aggregate_s']:>7.2f} {r['eval_s']:>7.1f} {r['overhead_s']:>10.1f} "
            f"{ratio:>14.2f} {r['up_bytes_per_client'] / 1e3:>13.1f} "
            f"{r['down_bytes_per_client'] / 1e3:>15.1f}"
        )
    steady = table[1:] or table
    med = {k: statistics.median(r[k] for r in steady) for k in steady[0] if k != "round"}
    lines.append("-" * len(head))
    span = f"{steady[0]['round']:.0f}-{steady[-1]['round']:.0f}"
    if med["train_s"] > 0:
        lines.append(
            f"steady state (median of rounds {span}): "
            f"round {med['round_s']:.1f} s = training {med['train_s']:.1f} s "
            f"({med['train_s'] / med['round_s']:.0%}) + eval {med['eval_s']:.1f} s + "
            f"aggregation {med['aggregate_s']:.2f} s + overhead {med['overhead_s']:.1f} s "
            f"(overhead/training = {med['overhead_s'] / med['train_s']:.2f}x)"
        )
    else:  # under client-level DP devices report no timing (it would leave in the clear)
        lines.append(
            f"steady state (median of rounds {span}): round {med['round_s']:.1f} s + eval "
            f"{med['eval_s']:.1f} s, aggregation {med['aggregate_s']:.2f} s; no training "
            "time reported (client-level DP: devices send their update and its size only)"
        )
    first = table[0]
    lines.append(
        f"round 1 (cold start): overhead {first['overhead_s']:.1f} s = "
        f"{first['overhead_s'] / med['overhead_s']:.1f}x the steady-state overhead"
        if med["overhead_s"] > 0 else "round 1 overhead not measurable"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.round_timing",
        description="Per-round time split and bytes per client of a federated run.",
    )
    parser.add_argument("--from-run", type=Path, help="analyse this finished run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override for a fresh run")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="where the fresh run's folder is written (default: ./runs)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="prepared models and data for a fresh run (default: "
                             "$FEDTUNE_CACHE or ./.fedtune-cache)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    run_dir = args.from_run
    if run_dir is None:
        from simulations.cli import main as fedtune

        runs = args.runs_dir
        before = set(runs.glob("*")) if runs.exists() else set()
        extra = [item for o in args.overrides for item in ("--set", o)]
        if args.cache_dir is not None:
            extra += ["--cache-dir", str(args.cache_dir)]
        code = fedtune(["simulate", "--no-progress", "--name", _bench_name(),
                        "--runs-dir", str(runs), *extra])
        if code:
            return code
        run_dir = max(set(runs.glob("bench-*")) - before)
    table = analyse(read_metrics(run_dir))
    if not table:
        print(f"{run_dir}: no training rounds in metrics.jsonl", file=sys.stderr)
        return 2
    print(f"run: {run_dir}")
    print(render(table))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


def _bench_name() -> str:
    import time

    return time.strftime("bench-%Y%m%d-%H%M%S")


if __name__ == "__main__":
    sys.exit(main())
