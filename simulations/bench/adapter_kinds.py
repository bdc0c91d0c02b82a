"""Benchmark: LoRA vs prompt tuning vs prefix tuning vs (IA)3 on torch clients, equal rounds.

    python -m simulations.bench.adapter_kinds                   # every kind, 10 rounds
    python -m simulations.bench.adapter_kinds --kinds lora,ia3 --rounds 5
    python -m simulations.bench.adapter_kinds --from-runs RUN ... # re-analyse finished runs

Every run is the default job (torch clients only, secure aggregation, the same seed, devices
and batches) with one ``lora.kind``; each kind keeps the learning rate it needs (``KINDS``:
soft prompts, prefixes and (IA)3 scales move far less per unit of step than LoRA's B, the
usual finding since Lester et al. 2021 and Liu et al. 2022). Each rate is the best of a
sweep on one device (12 AdamW steps from the initial adapter, held-out loss of four other
devices), recorded in BENCHMARKS.md. Prints per kind the final held-out
perplexity, the trainable parameters, the upload per client per round as it travelled
(masked under secure aggregation) and the coordinator's wall time per round, then every
run's perplexity per round; writes ``adapter_kinds.json`` and ``.png`` next to the runs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from simulations.bench.named_runs import (
    Variant,
    add_run_options,
    cell,
    chosen_runs,
    perplexity_rounds,
    read_runs,
    render_rounds,
    save_result,
    variant_of,
)

PRESET = Path(__file__).resolve().parents[1] / "configs" / "default.toml"

KINDS: dict[str, Variant] = {kind.name: kind for kind in (
    Variant("lora", "FFA-LoRA r = 8 on q, v, o, up, down (the default), lr 0.001", ()),
    Variant("lora-lr3", "the same at lr 0.003 (the best of its sweep)",
            ("train.learning_rate=0.003",)),
    Variant("prompt", "prompt tuning, 16 virtual tokens, lr 0.003",
            ("lora.kind=prompt", "train.learning_rate=0.003")),
    Variant("prefix", "prefix tuning, 16 virtual tokens, lr 0.03",
            ("lora.kind=prefix", "train.learning_rate=0.03")),
    Variant("ia3", "(IA)3 on k, v, down, lr 0.03", ("lora.kind=ia3", "train.learning_rate=0.03")),
    Variant("ia3-lr1", "the same at lr 0.01 (at 0.03 ten rounds oscillate)",
            ("lora.kind=ia3", "train.learning_rate=0.01")),
)}


def _trainable(run: Path) -> int:
    """Trainable parameters of the run's adapter (its saved spec)."""
    spec = json.loads((run / "adapter_spec.json").read_text())
    return sum(math.prod(t["shape"]) for t in spec["tensors"].values() if t["trainable"])


def compare(runs: list[Path]) -> dict[str, Any]:
    metrics = read_runs(runs, KINDS)
    folders = {variant_of(r, KINDS): r for r in runs}
    table = perplexity_rounds(metrics)
    summary = []
    for name, rows in metrics.items():
        trained = rows[1:len(table)]
        clients = sum(int(r.get("clients", 0)) for r in trained)
        summary.append({
            "run": name,
            "final_perplexity": table[-1][name],
            "trainable": _trainable(folders[name]),
            "bytes_up_per_client": sum(int(r.get("bytes_up", 0)) for r in trained)
            / max(clients, 1),
            "round_s": sum(float(r.get("round_s", 0.0)) for r in trained) / len(trained),
        })
    return {"runs": {name: str(run) for name, run in folders.items()}, "rounds": table,
            "summary": summary}


def render(result: dict[str, Any]) -> str:
    head = (f"{'kind':<8} {'final ppl':>9} {'trainable':>10} {'B up/client/round':>17} "
            f"{'round s':>8}")
    lines = [head, "-" * len(head)]
    for s in result["summary"]:
        lines.append(f"{s['run']:<8} {cell(s['final_perplexity'], '.2f'):>9} {s['trainable']:>10,} "
                     f"{s['bytes_up_per_client']:>17,.0f} {s['round_s']:>8.1f}")
    names = [s["run"] for s in result["summary"]]
    return "\n".join([*lines, "", *render_rounds(result["rounds"], names, 9)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.adapter_kinds",
        description="LoRA, prompt, prefix and (IA)3 adapters on the default job at equal "
                    "rounds: perplexity, trainable parameters, bytes up, time per round.",
        epilog="kinds: " + "; ".join(f"{k}: {v.what}" for k, v in KINDS.items()))
    parser.add_argument("--kinds", dest="variants", default=",".join(KINDS),
                        help="comma-separated runs (see below)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="train.rounds of every run; 0 = the preset's")
    add_run_options(parser, preset=PRESET, prefix="adapter-kinds", variant="kind")
    args = parser.parse_args(argv)
    runs = chosen_runs(args, parser, KINDS,
                       [f"train.rounds={args.rounds}"] if args.rounds else [])
    result = compare(runs)
    print(render(result))
    plot = save_result(result, runs, "adapter_kinds",
                       "adapter kinds on torch clients, equal rounds")
    print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
