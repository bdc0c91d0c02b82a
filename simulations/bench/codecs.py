"""Benchmark: the update codecs on the default job — bytes up against held-out perplexity.

    python -m simulations.bench.codecs                          # every codec, then the table
    python -m simulations.bench.codecs --codecs fp32,int4,sign1 --rounds 5
    python -m simulations.bench.codecs --secagg --codecs fp32,int4,int3,int2  # masked
    python -m simulations.bench.codecs --from-runs runs/codecs-*   # re-analyse finished runs

One federated simulation per codec with identical settings (the defaults, the same seed, so
the same devices and batches each round), differing only in ``federation.codec``. Lossy
codecs travel as plaintext, so every run — the fp32 baseline included — runs with
``security.secagg = false``; error feedback is on (the default). Per codec: bytes up per
client per round (the packed record as it travels), their ratio to the **fp32 state of a
plain-LoRA adapter** (A and B, what an uncompressed LoRA upload weighs; FFA-LoRA's fp32
upload is half of it), the final held-out perplexity and its relative change against the
fp32 run. Issue 16's goal: <= 1/16 of the plain-LoRA fp32 bytes at <= 1 % relative
perplexity change. ``--secagg`` runs every codec (the fp32 baseline too) under secure
aggregation instead, where the integer codecs quantize inside the masks: the bytes are then
the masked vectors as they travel.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics

CODECS = ("fp32", "bf16", "fp16", "int8", "int4", "int2", "topk", "sign1")
GOAL_BYTES, GOAL_PPL = 1 / 16, 0.01


def run_all(args: argparse.Namespace) -> list[Path]:
    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from protocols.environment import configure_environment
    from simulations.runner import check_inputs, run_federated

    configure_environment()
    cache = args.cache_dir or default_cache_dir()
    runs = []
    for codec in args.codecs:
        overrides = [f"federation.codec={codec}", f"security.secagg={str(args.secagg).lower()}",
                     *([f"train.rounds={args.rounds}"] if args.rounds else []), *args.set]
        inputs = check_inputs(load_config(None, overrides), cache)
        mode = "-secagg" if args.secagg else ""
        runs.append(run_federated(inputs, args.runs_dir, name=f"{args.prefix}{mode}-{codec}"))
        print(f"finished {runs[-1]}", file=sys.stderr, flush=True)
    return runs


def summarize(run_dir: Path) -> dict[str, Any]:
    """One run's codec, mean bytes up per client per round, the plain-LoRA fp32 state's
    bytes (from the run's adapter spec) and the final held-out perplexity."""
    from protocols.adapter_spec import AdapterSpec
    from protocols.config_file import load_config

    config = load_config(run_dir / "config.toml")
    codec = config.federation.codec
    spec = AdapterSpec.from_json((run_dir / "adapter_spec.json").read_text())
    state = sum(4 * math.prod(t.shape) for t in spec.tensors.values())
    rows = [r for r in read_metrics(run_dir) if r["round"] > 0 and r.get("clients", 0) > 0]
    if not rows:
        raise ValueError(f"{run_dir}: no trained round")
    per_client = sum(r["bytes_up"] for r in rows) / sum(r["clients"] for r in rows)
    final = [r for r in read_metrics(run_dir) if "perplexity" in r][-1]["perplexity"]
    return {"codec": codec, "secagg": config.security.secagg, "run": str(run_dir),
            "rounds": len(rows),
            "up_bytes_per_client": per_client, "lora_state_bytes": state,
            "perplexity": float(final)}


def compare(runs: list[Path]) -> dict[str, Any]:
    rows = [summarize(r) for r in runs]
    bases = {r["secagg"]: r for r in rows if r["codec"] == "fp32"}  # per mode
    for r in rows:
        base = bases.get(r["secagg"])
        r["bytes_vs_lora_fp32"] = r["up_bytes_per_client"] / r["lora_state_bytes"]
        r["ppl_change"] = (r["perplexity"] / base["perplexity"] - 1) if base else None
        r["goal"] = bool(base) and r["bytes_vs_lora_fp32"] <= GOAL_BYTES and \
            abs(r["ppl_change"]) <= GOAL_PPL
    return {"rows": rows, "baselines": [b["run"] for b in bases.values()]}


def render(result: dict[str, Any]) -> str:
    lines = [f"{'codec':<8} {'secagg':>6} {'rounds':>6} {'up KB/client/round':>19} "
             f"{'x LoRA fp32':>12} {'perplexity':>10} {'vs fp32':>8} {'goal':>5}"]
    for r in result["rows"]:
        change = "-" if r["ppl_change"] is None else f"{100 * r['ppl_change']:+.2f}%"
        lines.append(f"{r['codec']:<8} {'on' if r['secagg'] else 'off':>6} {r['rounds']:>6} "
                     f"{r['up_bytes_per_client'] / 1e3:>19.1f} "
                     f"{r['bytes_vs_lora_fp32']:>12.4f} {r['perplexity']:>10.2f} "
                     f"{change:>8} {'met' if r['goal'] else '-':>5}")
    lines.append(f"goal: <= {GOAL_BYTES:.4f} of the plain-LoRA fp32 state at <= "
                 f"{100 * GOAL_PPL:.0f} % relative perplexity change (the fp32 run of the same "
                 "mode, same seed)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.codecs",
        description="One simulation per update codec, same seed: bytes up per client and "
                    "round against the plain-LoRA fp32 state, and the final perplexity.")
    parser.add_argument("--codecs", default=",".join(CODECS),
                        help="comma-separated codecs; fp32 is the baseline")
    parser.add_argument("--secagg", action="store_true",
                        help="run under secure aggregation (fp32 and the integer codecs)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (0: the default job's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other config override, for every run")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="codecs")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--from-runs", nargs="+", type=Path, default=None,
                        help="analyse finished runs instead of running")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    args.codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if "auto" in args.codecs:  # the table names each run by the codec its config names
        parser.error("--codecs: name the codecs; 'auto' chooses one per budget")
    runs = args.from_runs or run_all(args)
    result = compare(runs)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
