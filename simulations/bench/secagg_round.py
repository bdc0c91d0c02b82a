"""Benchmark: what secure aggregation adds to a real round — training included — at a large
cohort, plain against SecAgg+ (and optionally full SecAgg), same preset and seed.

    python -m simulations.bench.secagg_round                          # 400 devices per round
    python -m simulations.bench.secagg_round --clients-per-round 100 --rounds 3
    python -m simulations.bench.secagg_round --from-runs PLAIN SECAGG+  # re-analyse

``simulations.bench.secagg_scaling`` times the protocol alone (a random update, no
training). This one runs the ~1,000-device preset (``simulations/configs/
population-1000.toml``: one cheap AdamW step per device) on Flower's Simulation Engine, once
per mode, with the same seed (the same devices and batches every round), and compares the
rounds' wall time without the central evaluation: the sampled devices' training, their
SecAgg stages, the coordinator's unmasking and aggregation and Flower's messaging, all on
this machine's cores. Round 1 also holds the actors' start-up and model load, so the
comparison takes the median of rounds 2 onwards when there are any.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics
from simulations.bench.named_runs import NamedRuns, add_run_options, variant_of
from simulations.bench.secagg_scaling import plus_degree

PRESET = Path(__file__).resolve().parents[1] / "configs" / "population-1000.toml"
MODES = ("plain", "secagg+", "secagg")


def mode_overrides(mode: str, clients_per_round: int) -> list[str]:
    """The config keys that make ``mode`` at this cohort size."""
    if mode == "plain":
        return ["security.secagg=false"]
    if mode == "secagg+":
        return ["security.secagg=true",
                f"security.secagg_neighbours={plus_degree(clients_per_round)}"]
    return ["security.secagg=true", "security.secagg_neighbours=0"]


def run_modes(args: argparse.Namespace, modes: list[str]) -> list[Path]:
    runs = NamedRuns(args)
    out = []
    for mode in modes:
        overrides = [f"train.rounds={args.rounds}",
                     f"train.clients_per_round={args.clients_per_round}",
                     *args.set, *mode_overrides(mode, args.clients_per_round)]
        out.append(runs.run(mode, runs.inputs(overrides)))
    return out


def summarise(run: Path) -> dict[str, Any]:
    """Per round: wall seconds without evaluation, the slowest device's training, the
    coordinator's aggregation; and their medians over the steady rounds."""
    rows = [r for r in read_metrics(run) if r.get("round", 0) > 0 and "round_s" in r]
    if not rows:
        raise SystemExit(f"{run}: no finished round in its metrics")
    rounds = [{"round": r["round"], "round_s": r["round_s"],
               "train_s": max(r["client_train_s"]) if r["client_train_s"] else 0.0,
               "aggregate_s": r["aggregate_s"], "clients": r["clients"],
               "up_bytes_per_client": r["bytes_up"] / max(r["clients"], 1)} for r in rows]
    steady = rounds[1:] or rounds
    median = {k: statistics.median(r[k] for r in steady)
              for k in ("round_s", "train_s", "aggregate_s", "up_bytes_per_client")}
    return {"run": str(run), "mode": variant_of(run, MODES), "rounds": rounds,
            "steady_rounds": [r["round"] for r in steady], **median}


def compare(runs: list[Path]) -> dict[str, Any]:
    modes = [summarise(r) for r in runs]
    plain = next((m for m in modes if m["mode"] == "plain"), None)
    for m in modes:
        m["x_plain"] = m["round_s"] / plain["round_s"] if plain else None
    return {"modes": modes}


def render(result: dict[str, Any]) -> str:
    head = (f"{'mode':>8} {'rounds':>7} {'clients':>8} {'round s':>8} {'x plain':>8} "
            f"{'train s':>8} {'aggr s':>7} {'up KB/client':>13}")
    lines = [head, "-" * len(head)]
    for m in result["modes"]:
        steady = m["steady_rounds"]
        span = f"{steady[0]}-{steady[-1]}" if len(steady) > 1 else f"{steady[0]}"
        ratio = f"{m['x_plain']:.2f}x" if m["x_plain"] is not None else "-"
        clients = statistics.median(r["clients"] for r in m["rounds"])
        lines.append(f"{m['mode']:>8} {span:>7} {clients:>8.0f} {m['round_s']:>8.1f} "
                     f"{ratio:>8} {m['train_s']:>8.2f} {m['aggregate_s']:>7.2f} "
                     f"{m['up_bytes_per_client'] / 1e3:>13.1f}")
    lines.append("")
    lines.append("round s: median wall time of the rounds named (no central evaluation); "
                 "train s: the slowest device's training; aggr s: the coordinator's "
                 "unmasking and aggregation")
    for m in result["modes"]:
        if m["mode"] != "plain" and m["x_plain"] is not None:
            verdict = "met" if m["x_plain"] <= 1.5 else "not met"
            lines.append(f"goal {m['mode']} <= 1.5x the plain round: {m['x_plain']:.2f}x "
                         f"({verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.secagg_round",
        description="Secure aggregation's cost in a real round (training included): the "
                    "1,000-device preset, plain vs SecAgg+ (vs SecAgg), same seed.")
    parser.add_argument("--clients-per-round", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per mode (round 1 holds the start-up; later rounds "
                             "are compared when there are any)")
    parser.add_argument("--modes", default="plain,secagg+",
                        help=f"comma-separated, from {', '.join(MODES)}; plain is the "
                             "baseline (full SecAgg at 400 devices takes ~10 min a round)")
    add_run_options(parser, preset=PRESET, prefix="secagg-round", variant="mode")
    args = parser.parse_args(argv)
    if args.from_runs:
        runs = list(args.from_runs)
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if "plain" not in modes or any(m not in MODES for m in modes):
            parser.error(f"--modes must include plain and name only {', '.join(MODES)}")
        runs = run_modes(args, modes)
    result = compare(runs)
    print(render(result))
    out = runs[0].parent / "secagg_round.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
