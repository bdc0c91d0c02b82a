"""Benchmark: heterogeneous LoRA ranks on the default job — devices of ranks 4 / 8 / 16 in
one federation against every device at rank 8.

    python -m simulations.bench.ranks                        # both runs, then the table
    python -m simulations.bench.ranks --rounds 5 --secagg
    python -m simulations.bench.ranks --from-runs runs/ranks-*   # re-analyse finished runs

Two federated simulations with the defaults and the same seed (so the same devices and
batches each round), differing only in the ranks: ``all-8`` (``lora.r = 8``, the default)
and ``mixed`` (global ``lora.r = 16`` with ``lora.alpha = 32``, the same scaling
``alpha / r = 2``, and ``lora.device_ranks = [4, 8, 16]``: a third of the devices at each
rank; FFA-LoRA's zero-padded B's average exactly). Uploads travel in the clear by
default, so each device's bytes are those of its own rank (``--secagg``: masked vectors,
which a lower rank pads to the global rank). Per run: trainable coordinates of
the global adapter, bytes up per client per round, the final held-out perplexity and its
relative change against ``all-8``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics

VARIANTS: dict[str, list[str]] = {
    "all-8": ["lora.r=8"],
    # alpha doubles with the rank, so both runs share the LoRA scaling alpha / r = 2
    "mixed": ["lora.r=16", "lora.alpha=32", "lora.device_ranks=[4, 8, 16]"],
}
BASELINE = "all-8"


def run_all(args: argparse.Namespace) -> list[Path]:
    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from protocols.environment import configure_environment
    from simulations.runner import check_inputs, run_federated

    configure_environment()
    cache = args.cache_dir or default_cache_dir()
    runs = []
    for name in args.variants:
        overrides = [f"security.secagg={str(args.secagg).lower()}",
                     *([f"train.rounds={args.rounds}"] if args.rounds else []), *args.set,
                     *VARIANTS[name]]  # the variant's ranks win
        inputs = check_inputs(load_config(None, overrides), cache)
        runs.append(run_federated(inputs, args.runs_dir, name=f"{args.prefix}-{name}"))
        print(f"finished {runs[-1]}", file=sys.stderr, flush=True)
    return runs


def summarize(run_dir: Path) -> dict[str, Any]:
    from protocols.adapter_spec import AdapterSpec
    from protocols.config_file import load_config

    config = load_config(run_dir / "config.toml")
    spec = AdapterSpec.from_json((run_dir / "adapter_spec.json").read_text())
    rows = [r for r in read_metrics(run_dir) if r["round"] > 0 and r.get("clients", 0) > 0]
    if not rows:
        raise ValueError(f"{run_dir}: no trained round")
    ranks = "/".join(map(str, config.lora.device_ranks)) or str(config.lora.r)
    final = [r for r in read_metrics(run_dir) if "perplexity" in r][-1]["perplexity"]
    variant = next((v for v in VARIANTS if run_dir.name.endswith(f"-{v}")), run_dir.name)
    return {"variant": variant, "ranks": ranks, "global_rank": config.lora.r,
            "secagg": config.security.secagg,
            "run": str(run_dir), "rounds": len(rows),
            "trainable": sum(math.prod(spec.tensors[k].shape) for k in spec.trainable_keys),
            "up_bytes_per_client": sum(r["bytes_up"] for r in rows) / sum(
                r["clients"] for r in rows),
            "perplexity": float(final)}


def compare(runs: list[Path]) -> dict[str, Any]:
    rows = [summarize(r) for r in runs]
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    for r in rows:
        r["ppl_change"] = (r["perplexity"] / base["perplexity"] - 1) if base else None
    return {"rows": rows, "baseline": base["run"] if base else None}


def render(result: dict[str, Any]) -> str:
    lines = [f"{'variant':<8} {'device ranks':>12} {'global r':>8} {'secagg':>6} "
             f"{'rounds':>6} {'trainable':>10} {'up KB/client/round':>19} {'perplexity':>10} "
             f"{'vs all-8':>9}"]
    for r in result["rows"]:
        change = "-" if r["ppl_change"] is None else f"{100 * r['ppl_change']:+.2f}%"
        lines.append(f"{r['variant']:<8} {r['ranks']:>12} {r['global_rank']:>8} "
                     f"{'on' if r['secagg'] else 'off':>6} {r['rounds']:>6} "
                     f"{r['trainable']:>10,} {r['up_bytes_per_client'] / 1e3:>19.1f} "
                     f"{r['perplexity']:>10.2f} {change:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.ranks",
        description="Mixed LoRA ranks (4 / 8 / 16 devices) against every device at rank 8, "
                    "same seed: bytes up per client and round, final perplexity.")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--secagg", action="store_true", help="run under secure aggregation")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (0: the default job's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other config override, for every run (the variant's lora "
                             "settings win)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="ranks")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--from-runs", nargs="+", type=Path, default=None,
                        help="analyse finished runs instead of running")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    runs = args.from_runs or run_all(args)
    result = compare(runs)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
