"""Benchmark: do edge (forward-only) devices add to a federation? One run per edge lever.

    python -m simulations.bench.edge_levers                     # every lever, 10 rounds
    python -m simulations.bench.edge_levers --levers torch-only,torch-half,components
    python -m simulations.bench.edge_levers --from-runs RUN ... # re-analyse finished runs

Every run takes the default preset with the same seed, budget (``train.rounds``, devices per
round, local steps) and plain aggregation (edge devices then upload seeds and scalars; under
secure aggregation they send a masked dense delta). With ``edge.fraction = 0.5`` half of the
roles are edge devices (MeZO on the signed ONNX export, no torch); each round samples the
same devices in every run with that fraction. The runs (``LEVERS``):

* ``torch-only``: every role a torch (backprop) device; the reference to reach;
* ``torch-half``: the mixed federation with its edge devices' updates left out
  (``edge.combine = 'exclude'``): what its torch half reaches alone, at the same sampling;
* the mixed federation with each edge lever: today's default (full-space MeZO averaged in),
  ``add`` (the edge mean added to the torch mean instead of averaged with it), and the
  ``components`` subspace (MeZO over ~1,000 rescalings of the learned rank-one components,
  :mod:`protocols.seed_updates`), also with three times the steps, and the
  ``trajectory`` subspace (MeZO along one direction, the coordinator's last step of the
  global adapter: how far to go on along it, or back, measured on edge devices' data);
* the same federations with a prompt adapter (``lora.kind = 'prompt'``, 9,216
  coordinates) or an (IA)3 adapter (57,600) on every device instead of LoRA: spaces MeZO
  can search in twelve steps; and with
  each edge device weighting its update by the progress it measures on its own held-out
  blocks (``edge.check_blocks``);
* ``judged`` and ``trajectory-judged``: the round's edge devices score multiples of the
  aggregated step on their own held-out blocks before it is applied (``edge.line_search``),
  beside the same federations with a fixed longer step (``train.server_learning_rate``,
  ``torch-only-x1.5``, ``torch-only-x2``, ``torch-half-x1.5``): does the edge devices'
  choice add more than a longer step would?

Prints per run the final held-out perplexity, the mean upload per client per round by kind
and the mean training seconds per client per round by kind (what each device reports), and
per round every run's perplexity and the multiple each line search applied; writes
``edge_levers.json`` and ``.png`` next to the runs.
"""

from __future__ import annotations

import argparse
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
#: What every run shares: plaintext uploads, so edge devices send seeds and scalars.
COMMON = ("security.secagg=false",)
MIXED = ("edge.fraction=0.5",)
#: The components subspace's tuned step (relative: each step rescales a component by
#: lr·g; measured from a 3-round adapter, 12 steps: lr 3 -> -0.0028 held-out loss per
#: device, 10 -> -0.0064, 30 -> overshoots) and perturbation (1 % of a component).
COMPONENTS = ("edge.combine=add", "edge.subspace=components", "edge.epsilon=0.01")
#: The trajectory subspace: MeZO along the coordinator's last step of the global adapter
#: (one direction), its step in units of that step (measured from rounds 4 and 5 of
#: torch-only, 12 steps, 4 devices: lr 2 -> s 0.36..0.59 along a step that helped, 5 ->
#: 0.45..0.73, 10 -> 0.47..0.90, each -1.6 to -2.7 % perplexity; along a step that hurt, lr 10
#: -> s -0.41..-0.58 on 3 of 4 devices, -1 %), perturbed by 1 % of the step.
TRAJECTORY = ("edge.combine=add", "edge.subspace=trajectory", "edge.epsilon=0.01",
              "edge.learning_rate=2")
#: The federated line search: the round's edge devices score the aggregated step at these
#: multiples on 8 of their own held-out blocks and the coordinator applies the best. Offline,
#: along torch-only's round-4 step (central optimum about 2), eight devices each chose 1.5,
#: 1 or 2; along round 5's harmful step (central optimum 0.5), four chose 0.5 or 1.
LINE_SEARCH = ("edge.line_search=0,0.5,1,1.5,2,3",)
#: Prompt tuning on every device, at the best rates of one-device sweeps (torch AdamW and
#: edge MeZO: both 0.003).
PROMPT = ("lora.kind=prompt", "train.learning_rate=0.003", "edge.learning_rate=0.003")
#: (IA)3 at 0.01 on both kinds: a third of the best one-round rates (torch AdamW 0.03,
#: MeZO 0.03), since at 0.03 ten federated rounds of AdamW oscillate (adapter_kinds).
IA3 = ("lora.kind=ia3", "train.learning_rate=0.01", "edge.learning_rate=0.01")


LEVERS: dict[str, Variant] = {lever.name: lever for lever in (
    Variant("torch-only", "every role a torch device (the reference)", ("edge.fraction=0",)),
    Variant("torch-half", "half the roles edge, their updates left out (the torch half alone)",
          (*MIXED, "edge.combine=exclude")),
    Variant("average", "half edge, full-space MeZO (lr 0.001) averaged in: the old default",
          MIXED),
    Variant("add", "half edge, full-space MeZO, its mean added to the torch mean",
          (*MIXED, "edge.combine=add")),
    Variant("components", "half edge, MeZO over the learned components (lr 8), added",
          (*MIXED, *COMPONENTS, "edge.learning_rate=8")),
    Variant("trajectory", "half edge, MeZO along the federation's last step (lr 2), added",
            (*MIXED, *TRAJECTORY)),
    Variant("trajectory-checked", "trajectory, each edge device sending the length of its "
            "update (1, 1/2, 1/4, 0) that scores best on 8 of its own held-out blocks",
            (*MIXED, *TRAJECTORY, "edge.check_blocks=8")),
    Variant("trajectory-checked-5", "trajectory-checked with a 2.5x larger step (lr 5)",
            (*MIXED, *TRAJECTORY, "edge.check_blocks=8", "edge.learning_rate=5")),
    Variant("judged", "half edge, full-space MeZO added; the round's edge devices choose the "
            "length of the aggregated step (0 to 3x) on their own held-out blocks",
            (*MIXED, "edge.combine=add", *LINE_SEARCH)),
    Variant("trajectory-judged", "trajectory-checked, and the round's edge devices choose "
            "the length of the aggregated step (0 to 3x) on their own held-out blocks",
            (*MIXED, *TRAJECTORY, "edge.check_blocks=8", *LINE_SEARCH)),
    # The fair reference for the line search: torch devices only, with their aggregated
    # step lengthened by a fixed factor every round (the lengths the judges chose most).
    Variant("torch-only-x1.5", "every role a torch device, the aggregated step x1.5 "
            "(train.server_learning_rate)", ("edge.fraction=0", "train.server_learning_rate=1.5")),
    Variant("torch-only-x2", "every role a torch device, the aggregated step x2",
            ("edge.fraction=0", "train.server_learning_rate=2")),
    Variant("trajectory-judged-narrow", "trajectory-judged choosing among 0.5 to 2x: a "
            "judge can halve a step, not refuse it", (*MIXED, *TRAJECTORY,
                                                      "edge.check_blocks=8",
                                                      "edge.line_search=0.5,1,1.5,2")),
    Variant("torch-half-x1.5", "the torch half alone (edge updates left out), its "
            "aggregated step x1.5", (*MIXED, "edge.combine=exclude",
                                     "train.server_learning_rate=1.5")),
    # Each kind doing what it can (edge.role = 'judge'): every round trains two torch
    # devices, found by asking kinds in the round's order, and edge devices outside the
    # sample score the length of their step. The torch half alone at that sampling is the
    # same draw without judges.
    Variant("judge-torch-half", "half the roles edge; every round trains torch devices "
            "only (edge.role = 'judge'), no judges: the torch half alone at that sampling",
            (*MIXED, "edge.role=judge")),
    Variant("judge-4", "half the roles edge; every round trains torch devices only and 4 "
            "edge devices outside the sample choose the length of their step (0.5 to 2x)",
            (*MIXED, "edge.role=judge", "edge.judges=4", "edge.line_search=0.5,1,1.5,2")),
    Variant("judge-4-momentum", "judge-4, the judges also choosing whether to add half of "
            "the last round's step (edge.line_search_momentum = [0, 0.5])",
            (*MIXED, "edge.role=judge", "edge.judges=4", "edge.line_search=0.5,1,1.5,2",
             "edge.line_search_momentum=0,0.5")),
    # Its reference: the same torch-only training with fixed server momentum (every round's
    # step plus half the last round's), no choice left to the edge devices (one judge, one
    # candidate; it downloads and scores, but cannot change the step).
    Variant("judge-torch-half-m0.5", "judge-torch-half with fixed server momentum: every "
            "round's step plus half the last round's (the reference for judge-4-momentum)",
            (*MIXED, "edge.role=judge", "edge.judges=1", "edge.line_search=1",
             "edge.line_search_momentum=0.5")),
    Variant("components-36", "components with 3x the steps (36, lr 4)",
          (*MIXED, *COMPONENTS, "edge.learning_rate=4", "edge.local_steps=36")),
    # A prompt adapter (16 x 576 = 9,216 coordinates) on every device: MeZO's space is 90x
    # smaller than FFA-LoRA's B. One edge device, 12 MeZO steps from the initial prompt:
    # held-out loss -0.034 to -0.070 at lr 0.003 (0.03: one of three devices got worse).
    Variant("prompt-torch-only", "prompt adapter, every role a torch device", PROMPT),
    Variant("prompt-torch-half", "prompt adapter, half edge, their updates left out",
            (*PROMPT, *MIXED, "edge.combine=exclude")),
    Variant("prompt-add", "prompt adapter, half edge, full-space MeZO (lr 0.003), added",
            (*PROMPT, *MIXED, "edge.combine=add")),
    Variant("prompt-average", "prompt adapter, half edge, MeZO averaged in",
            (*PROMPT, *MIXED)),
    # (IA)3 (57,600 scales): one edge device, 12 MeZO steps from the initial adapter:
    # -0.05 to -0.07 held-out loss at lr 0.01, -0.11 to -0.15 at 0.03.
    Variant("ia3-torch-only", "(IA)3 adapter, every role a torch device", IA3),
    Variant("ia3-torch-half", "(IA)3 adapter, half edge, their updates left out",
            (*IA3, *MIXED, "edge.combine=exclude")),
    Variant("ia3-add", "(IA)3 adapter, half edge, full-space MeZO (lr 0.01), added",
            (*IA3, *MIXED, "edge.combine=add")),
    Variant("prompt-checked", "prompt-add, each edge device sending the length of its update "
            "(1, 1/2, 1/4, 0) that scores best on 8 of its own held-out blocks",
            (*PROMPT, *MIXED, "edge.combine=add", "edge.check_blocks=8")),
)}


def _per_client(rows: list[dict[str, Any]], field: str, kind: str) -> float | None:
    """Mean of ``field`` (a by-kind total per round) per client of ``kind`` over the run."""
    total = sum(float(r.get(field, {}).get(kind, 0)) for r in rows)
    clients = sum(int(r.get("clients_by_kind", {}).get(kind, 0)) for r in rows)
    return total / clients if clients else None


def _per_judge(rows: list[dict[str, Any]], field: str) -> float | None:
    """Mean of ``field`` (a line search's traffic per round) per judge that answered."""
    judges = sum(int(r.get("line_search_judges", 0)) for r in rows)
    if not judges or not any(field in r for r in rows):  # (runs from before it was logged)
        return None
    return sum(int(r.get(field, 0)) for r in rows) / judges


def compare(runs: list[Path]) -> dict[str, Any]:
    """Per round every run's held-out perplexity; per run its final perplexity, upload and
    training time per client by kind, and coordinator wall time per round."""
    metrics = read_runs(runs, LEVERS)
    table = perplexity_rounds(metrics)
    summary = []
    for name, rows in metrics.items():
        trained = rows[1:len(table)]
        summary.append({
            "run": name,
            "final_perplexity": table[-1][name],
            "bytes_up_torch": _per_client(trained, "bytes_up_by_kind", "torch"),
            "bytes_up_edge": _per_client(trained, "bytes_up_by_kind", "edge"),
            "train_s_torch": _per_client(trained, "train_s_by_kind", "torch"),
            "train_s_edge": _per_client(trained, "train_s_by_kind", "edge"),
            "round_s": sum(float(r.get("round_s", 0.0)) for r in trained) / len(trained),
            "edge_updates": sum(int(r.get("clients_by_kind", {}).get("edge", 0))
                                for r in trained),
            "judges": sum(int(r.get("line_search_judges", 0)) for r in trained) / len(trained),
            "bytes_up_judge": _per_judge(trained, "judge_bytes_up"),
            "bytes_down_judge": _per_judge(trained, "judge_bytes_down"),
        })
    searched = {name: [r.get("line_search_multiple") for r in rows[1:len(table)]]
                for name, rows in metrics.items()
                if any("line_search_multiple" in r for r in rows)}
    # edge.line_search_momentum: the multiple of the last step added, as its own row
    searched.update({f"{name} +m": [r.get("line_search_momentum") for r in rows[1:len(table)]]
                     for name, rows in metrics.items()
                     if any("line_search_momentum" in r for r in rows)})
    return {"runs": {variant_of(r, LEVERS): str(r) for r in runs}, "rounds": table,
            "summary": summary, "line_search": searched}


def render(result: dict[str, Any]) -> str:
    w = max([14, *(len(s["run"]) for s in result["summary"]),
             *(len(name) for name in result.get("line_search", {}))])
    head = (f"{'run':<{w}} {'final ppl':>9} {'B up torch':>11} {'B up edge':>9} "
            f"{'s torch':>8} {'s edge':>7} {'round s':>8} {'edge upd':>8} {'judges':>6} "
            f"{'B up judge':>10} {'B down judge':>12}")
    lines = [head, "-" * len(head)]
    for s in result["summary"]:
        lines.append(
            f"{s['run']:<{w}} {cell(s['final_perplexity'], '.2f'):>9} "
            f"{cell(s['bytes_up_torch'], ',.0f'):>11} {cell(s['bytes_up_edge'], ',.0f'):>9} "
            f"{cell(s['train_s_torch'], '.1f'):>8} {cell(s['train_s_edge'], '.1f'):>7} "
            f"{s['round_s']:>8.1f} {s['edge_updates']:>8} {s.get('judges', 0):>6.1f} "
            f"{cell(s.get('bytes_up_judge'), ',.0f'):>10} "
            f"{cell(s.get('bytes_down_judge'), ',.0f'):>12}")
    names = [s["run"] for s in result["summary"]]
    lines += ["", *render_rounds(result["rounds"], names, 14)]
    searched: dict[str, list[float | None]] = result.get("line_search", {})
    if searched:  # edge.line_search: the multiple of each round's step that was applied
        rounds = max(len(v) for v in searched.values())
        head = f"{'line search':<{w}} " + " ".join(f"{r:>5}" for r in range(1, rounds + 1))
        lines += ["", head, "-" * len(head)]
        for name, multiples in searched.items():
            lines.append(f"{name:<{w}} " + " ".join(
                f"{cell(m, 'g'):>5}" for m in multiples))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.edge_levers",
        description="The mixed federation (half the roles edge devices) with each edge "
                    "lever, beside torch devices only and the torch half alone.",
        epilog="levers: " + "; ".join(f"{k}: {v.what}" for k, v in LEVERS.items()))
    parser.add_argument("--levers", dest="variants", default=",".join(LEVERS),
                        help="comma-separated runs (see below)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="train.rounds of every run; 0 = the preset's")
    add_run_options(parser, preset=PRESET, prefix="edge-levers", variant="lever")
    args = parser.parse_args(argv)
    common = [*COMMON, *([f"train.rounds={args.rounds}"] if args.rounds else [])]
    runs = chosen_runs(args, parser, LEVERS, common)
    result = compare(runs)
    print(render(result))
    plot = save_result(result, runs, "edge_levers",
                       "torch and edge devices on one adapter: edge levers")
    print(f"\nwrote {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
