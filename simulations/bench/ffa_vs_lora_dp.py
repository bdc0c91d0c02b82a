"""Benchmark: FFA-LoRA vs plain LoRA under client-level DP on the Shakespeare task.

    python -m simulations.bench.ffa_vs_lora_dp                     # two runs, then the table
    python -m simulations.bench.ffa_vs_lora_dp --from-runs A B     # re-analyse two runs

Two federated simulations with identical settings — secure aggregation with distributed
Gaussian noise (each client clips to C and adds its share, so the sum carries σ·C), the same
rounds, cohort, steps and seed — differing only in ``lora.freeze_a``. FFA-LoRA (Sun et al.,
ICLR 2024) trains B with A frozen: the noise lands on B only and enters the weights linearly
(ΔW = B·A), whereas with plain LoRA noise on both factors also multiplies (the product of
two noisy factors) and half of the clip budget is spent on A. Prints held-out perplexity per
round for both, the ε spent, and writes ``ffa_vs_lora_dp.png`` + ``.json`` next to the runs.

The default cohort (8 clients per round) is what this 2-core machine can train in a few
minutes; at that size a formally meaningful ε needs noise that erases an 829k-parameter
update, so the default σ is small and the reported ε is large. The comparison is at equal
σ, C and cohort, which is what the FFA-vs-LoRA question is about.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics


def _overrides(args: argparse.Namespace, freeze_a: bool) -> list[str]:
    return [
        f"lora.freeze_a={'true' if freeze_a else 'false'}",
        f"train.rounds={args.rounds}",
        f"train.clients_per_round={args.clients_per_round}",
        f"train.local_steps={args.local_steps}",
        "privacy.client_dp=true",
        f"privacy.clip_norm={args.clip_norm}",
        f"privacy.noise_multiplier={args.noise_multiplier}",
        "security.secagg=true",
        *args.set,
    ]


def run_pair(args: argparse.Namespace) -> tuple[Path, Path]:
    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from protocols.environment import configure_environment
    from simulations.runner import check_inputs, run_federated

    configure_environment()
    cache = args.cache_dir or default_cache_dir()
    out = []
    for freeze_a in (True, False):
        config = load_config(None, _overrides(args, freeze_a))
        inputs = check_inputs(config, cache)
        name = f"{args.prefix}-{'ffa' if freeze_a else 'lora'}"
        out.append(run_federated(inputs, args.runs_dir, name=name))
        print(f"finished {out[-1]}", file=sys.stderr)
    return out[0], out[1]


def compare(ffa: Path, lora: Path) -> dict[str, Any]:
    rows = {"ffa": read_metrics(ffa), "lora": read_metrics(lora)}
    table = []
    for a, b in zip(rows["ffa"], rows["lora"], strict=False):
        table.append({"round": a["round"], "ffa_perplexity": a.get("perplexity"),
                      "lora_perplexity": b.get("perplexity"), "epsilon": a.get("epsilon"),
                      "ffa_bytes_up": a.get("bytes_up"), "lora_bytes_up": b.get("bytes_up")})
    return {"ffa_run": str(ffa), "lora_run": str(lora), "rounds": table}


def render(result: dict[str, Any]) -> str:
    head = (f"{'round':>5} {'FFA-LoRA ppl':>13} {'LoRA ppl':>9} {'epsilon':>10} "
            f"{'up KB FFA/LoRA':>15}")
    lines = [head, "-" * len(head)]
    for r in result["rounds"]:
        eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "-"
        up = (f"{r['ffa_bytes_up'] / 1e3:.0f}/{r['lora_bytes_up'] / 1e3:.0f}"
              if r["ffa_bytes_up"] else "-")
        lines.append(f"{r['round']:>5} {r['ffa_perplexity']:>13.2f} {r['lora_perplexity']:>9.2f} "
                     f"{eps:>10} {up:>15}")
    last = result["rounds"][-1]
    lines.append(f"final perplexity FFA-LoRA / LoRA = "
                 f"{last['ffa_perplexity'] / last['lora_perplexity']:.3f} (same run settings)")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in result["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rounds, [r["ffa_perplexity"] for r in result["rounds"]], "o-", label="FFA-LoRA")
    ax.plot(rounds, [r["lora_perplexity"] for r in result["rounds"]], "s-", label="LoRA")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Under client-level DP (distributed noise, SecAgg)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.ffa_vs_lora_dp",
        description="FFA-LoRA vs plain LoRA under client-level DP, two federated runs.",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients-per-round", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--noise-multiplier", type=float, default=0.05)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any further config override, applied to both runs")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="dp-compare")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--from-runs", nargs=2, type=Path, metavar=("FFA_RUN", "LORA_RUN"),
                        help="analyse two finished runs instead of running")
    args = parser.parse_args(argv)
    ffa, lora = tuple(args.from_runs) if args.from_runs else run_pair(args)
    result = compare(ffa, lora)
    print(render(result))
    out = ffa.parent / "ffa_vs_lora_dp"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
