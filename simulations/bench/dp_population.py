"""Benchmark: client-level DP that learns over a ~1,000-device population, beside the same
run without DP.

    python -m simulations.bench.dp_population                       # non-DP, then each DP lever
    python -m simulations.bench.dp_population --rounds 5 --levers dp-r8,dp-r1
    python -m simulations.bench.dp_population --from-runs RUN ...   # re-analyse finished runs

Every run takes the population preset (``simulations/configs/population-1000.toml``: every
Shakespeare role with at least 3 speeches, 100 devices per round, one cheap local step) with
the same seed, so the runs sample the same devices with the same batches where their
settings allow. The DP runs clip every device's update to ``--clip-norm`` (by default the
furthest a round of Adam can move it: :func:`auto_clip_norm`) and add Gaussian noise of
``σ·C`` to the round's sum, with σ the smallest noise multiplier whose ε over all
``--rounds`` stays at most ``--epsilon`` (δ = ``privacy.delta``), from fedtune's accountant
at the run's own sampling rate q = clients per round / devices: the accountant's ε is then
≤ the target by construction, and the table prints the ε the run's ledger reports after
each round.

Noise on the mean update grows with the square root of the number of trained coordinates
(``σ·C·√d / n``), so the levers are those that shrink ``d`` or raise ``n`` (see
``LEVERS``); each is one run. Prints per round the held-out perplexity of every run and ε,
then per run the final perplexity and the share of the non-DP run's improvement over the
base model it keeps; writes ``dp_population.json`` and ``.png`` next to the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics
from simulations.bench.named_runs import NamedRuns, add_run_options, variant_of

PRESET = Path(__file__).resolve().parents[1] / "configs" / "population-1000.toml"


@dataclass(frozen=True)
class Lever:
    """One run of the comparison: its name, what it changes, and whether it is private."""

    name: str
    what: str
    overrides: tuple[str, ...]
    private: bool = True


LEVERS: dict[str, Lever] = {lever.name: lever for lever in (
    Lever("non-dp", "the preset without DP (the utility to keep)", (), private=False),
    Lever("dp-r8", "client-level DP, FFA-LoRA r = 8 (829,440 trained coordinates)", ()),
    Lever("dp-r1", "client-level DP, FFA-LoRA r = 1 (103,680 coordinates: noise / 2.8)",
          ("lora.r=1", "lora.alpha=2.0")),
    Lever("dp-r1-qv", "client-level DP, FFA-LoRA r = 1 on q_proj and v_proj only "
          "(30,720 coordinates: noise / 5.2)",
          ("lora.r=1", "lora.alpha=2.0", 'lora.target_modules=["q_proj","v_proj"]')),
    Lever("dp-r1-lr4", "dp-r1 with 4x the learning rate: the step grows 4x, the noise's "
          "harm (second order in the step) 16x, so while the noise is small it pays",
          ("lora.r=1", "lora.alpha=2.0", "train.learning_rate=0.004")),
)}


def _dp_overrides(clip_norm: float, sigma: float) -> list[str]:
    return ["privacy.client_dp=true", f"privacy.clip_norm={clip_norm:.6g}",
            f"privacy.noise_multiplier={sigma:.6g}"]


def trained_coordinates(inputs: Any) -> int:
    """How many coordinates a device's update has (the adapter's trainable tensors)."""
    from server.central_eval import CentralModel

    config = inputs.config
    central = CentralModel(inputs.model_dir, config, threads=1)
    return sum(int(v.size) for k, v in central.initial_adapter.items()
               if not config.lora.is_frozen(k))


def auto_clip_norm(*, learning_rate: float, local_steps: int, coordinates: int) -> float:
    """The furthest a round of Adam can move the update (each step moves a coordinate by at
    most about the learning rate): ``lr · steps · √d``. Public settings only, so choosing C
    this way costs no privacy; with one local step an update's norm is close to it (Adam's
    first step is ``lr · sign(g)``), so little is clipped and no noise is wasted."""
    return learning_rate * local_steps * math.sqrt(coordinates)


def calibrated_sigma(*, target_epsilon: float, delta: float, sample_rate: float, rounds: int,
                     accountant: str) -> float:
    """The smallest σ whose ε over ``rounds`` rounds at ``sample_rate`` is ≤ the target."""
    from protocols.privacy import noise_multiplier_for

    return noise_multiplier_for(target_epsilon=target_epsilon, delta=delta,
                                sample_rate=sample_rate, steps=rounds, accountant=accountant)


def run_levers(args: argparse.Namespace, names: list[str]) -> list[Path]:
    from protocols.privacy import client_sample_rate

    runs = NamedRuns(args)
    common = [f"train.rounds={args.rounds}", *args.set]
    out = []
    for name in names:
        lever = LEVERS[name]
        overrides = [*common, *lever.overrides]
        if lever.private:
            probed = runs.inputs(overrides)
            probe = probed.config
            devices = probed.num_clients
            q = client_sample_rate(clients_per_round=probe.train.clients_per_round,
                                   num_clients=devices)
            sigma = calibrated_sigma(target_epsilon=args.epsilon, delta=probe.privacy.delta,
                                     sample_rate=q, rounds=args.rounds,
                                     accountant=probe.privacy.accountant)
            print(f"{name}: q = {q:.4f} over {devices} devices, sigma = {sigma:.4f} for "
                  f"epsilon <= {args.epsilon} after {args.rounds} rounds", file=sys.stderr)
            clip = args.clip_norm or auto_clip_norm(
                learning_rate=probe.train.learning_rate, local_steps=probe.train.local_steps,
                coordinates=trained_coordinates(probed))
            print(f"{name}: clip norm C = {clip:.4g}", file=sys.stderr)
            overrides += _dp_overrides(clip, sigma)
        out.append(runs.run(name, runs.inputs(overrides)))
    return out


def compare(runs: list[Path]) -> dict[str, Any]:
    """Per round: every run's held-out perplexity and ε; per run: what it keeps."""
    metrics = {variant_of(r, LEVERS): read_metrics(r) for r in runs}
    names = list(metrics)
    if any(not rows for rows in metrics.values()):
        empty = [str(r) for r in runs if not metrics[variant_of(r, LEVERS)]]
        raise SystemExit(f"no metrics in {empty}: did these runs finish a round?")
    rounds = min(len(rows) for rows in metrics.values())
    table = []
    for i in range(rounds):
        row: dict[str, Any] = {"round": metrics[names[0]][i]["round"]}
        for name in names:
            row[f"{name}_perplexity"] = metrics[name][i].get("perplexity")
            row[f"{name}_epsilon"] = metrics[name][i].get("epsilon")
        table.append(row)
    base = table[0][f"{names[0]}_perplexity"]
    reference = "non-dp" if "non-dp" in names else None
    summary = []
    for name in names:
        final = table[-1][f"{name}_perplexity"]
        kept = None
        if reference is not None:
            gain = base - table[-1][f"{reference}_perplexity"]
            kept = (base - final) / gain if gain > 0 else None
        summary.append({"run": name, "final_perplexity": final,
                        "improvement": (base - final) / base,
                        "kept_of_non_dp": kept,
                        "epsilon": table[-1][f"{name}_epsilon"]})
    return {"runs": {variant_of(r, LEVERS): str(r) for r in runs}, "base_perplexity": base,
            "rounds": table, "summary": summary}


def render(result: dict[str, Any]) -> str:
    names = [s["run"] for s in result["summary"]]
    private = [n for n in names if any(r[f"{n}_epsilon"] for r in result["rounds"])]
    head = f"{'round':>5} " + " ".join(f"{n + ' ppl':>14}" for n in names) + " " + " ".join(
        f"{'eps ' + n:>12}" for n in private)
    lines = [head, "-" * len(head)]
    for r in result["rounds"]:
        ppl = " ".join(f"{r[f'{n}_perplexity']:>14.2f}" for n in names)
        eps = " ".join(f"{r[f'{n}_epsilon'] or 0.0:>12.3f}" for n in private)
        lines.append(f"{r['round']:>5} {ppl} {eps}")
    lines.append("")
    lines.append(f"base model perplexity {result['base_perplexity']:.2f}")
    for s in result["summary"]:
        kept = (f", keeps {100 * s['kept_of_non_dp']:.0f} % of the non-DP improvement"
                if s["kept_of_non_dp"] is not None and s["run"] != "non-dp" else "")
        eps = f" at epsilon {s['epsilon']:.2f}" if s["epsilon"] else ""
        side = "below" if s["improvement"] >= 0 else "above"
        lines.append(f"{s['run']}: final {s['final_perplexity']:.2f} "
                     f"({100 * abs(s['improvement']):.1f} % {side} base){eps}{kept}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in result["rounds"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for s in result["summary"]:
        name = s["run"]
        label = name if not s["epsilon"] else f"{name} (ε = {s['epsilon']:.2f})"
        ax.plot(rounds, [r[f"{name}_perplexity"] for r in result["rounds"]], "o-", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("~1,000 devices, 100 per round: client-level DP vs none")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.dp_population",
        description="Client-level DP at a target epsilon over the ~1,000-device preset, "
                    "beside the same run without DP; one run per lever.",
        epilog="levers: " + "; ".join(f"{k}: {v.what}" for k, v in LEVERS.items()),
    )
    parser.add_argument("--levers", default="non-dp,dp-r8,dp-r1",
                        help="comma-separated runs (see below); non-dp is the reference")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=8.0,
                        help="target epsilon over all rounds (delta: privacy.delta)")
    parser.add_argument("--clip-norm", type=float, default=0.0,
                        help="C; 0 = per run, lr * local_steps * sqrt(d) for d trained "
                             "coordinates (one AdamW step moves each by about lr)")
    add_run_options(parser, preset=PRESET, prefix="dp-population", variant="lever")
    args = parser.parse_args(argv)
    if args.from_runs:
        runs = list(args.from_runs)
    else:
        names = [n.strip() for n in args.levers.split(",") if n.strip()]
        unknown = [n for n in names if n not in LEVERS]
        if unknown or not names:
            parser.error(f"unknown lever(s) {unknown}; choose from {sorted(LEVERS)}")
        runs = run_levers(args, names)
    result = compare(runs)
    print(render(result))
    out = runs[0].parent / "dp_population"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
