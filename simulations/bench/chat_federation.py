"""Benchmark: instruction tuning on the chatterbot federation — base vs federated vs
centralized at equal examples seen, on answer perplexity and ROUGE-L.

    python -m simulations.bench.chat_federation                    # two runs, then the table
    python -m simulations.bench.chat_federation --from-runs FED CEN  # re-analyse two runs

The built-in chatterbot corpus (``data.source = "chatterbot"``): dialogues in 28 languages,
one device per language x category (naturally non-IID: each device has one language and one
topic), rendered with SmolLM2-Instruct's chat template, trained and scored on the answers
only. One federated run (the defaults: FFA-LoRA, secure aggregation, ``clients_per_round``
devices per round) and the centralized baseline on the union of the same training examples
with the same number of examples seen (rounds x devices x steps x batch), both scored each
round on the same held-out answers and, after the last round, on greedy answers to
``eval.generate`` held-out prompts (ROUGE-L F1 against the reference answer). Round 0 and
the "base" generations are the base model.

Prints one table (perplexity and ROUGE-L of base, federated, centralized) and the ratios
measured in this run, and writes ``chat_federation.json`` beside the runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics

GENERATIONS = "generations.json"


def _overrides(args: argparse.Namespace) -> list[str]:
    return [
        "data.source=chatterbot",
        f"data.min_examples={args.min_examples}",
        f"train.rounds={args.rounds}",
        f"train.clients_per_round={args.clients_per_round}",
        f"train.local_steps={args.local_steps}",
        f"train.seq_len={args.seq_len}",
        f"eval.generate={args.prompts}",
        *args.set,
    ]


def run_pair(args: argparse.Namespace) -> tuple[Path, Path]:
    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from protocols.environment import configure_environment
    from simulations.runner import check_inputs, run_centralized, run_federated

    configure_environment()
    config = load_config(None, _overrides(args))
    inputs = check_inputs(config, args.cache_dir or default_cache_dir())
    print(f"{inputs.num_clients} devices (language x category), {config.train.rounds} rounds "
          f"x {config.train.clients_per_round} devices", file=sys.stderr)
    federated = run_federated(inputs, args.runs_dir, name=f"{args.prefix}-federated")
    centralized = run_centralized(inputs, args.runs_dir, name=f"{args.prefix}-centralized")
    return federated, centralized


def compare(federated: Path, centralized: Path) -> dict[str, Any]:
    fed, cen = read_metrics(federated), read_metrics(centralized)
    fed_gen = _generations(federated)
    cen_gen = _generations(centralized)
    return {
        "federated_run": str(federated), "centralized_run": str(centralized),
        "perplexity": {"base": fed[0].get("perplexity"), "federated": fed[-1].get("perplexity"),
                       "centralized": cen[-1].get("perplexity")},
        "rouge_l": {"base": fed_gen["scores"]["base"] if fed_gen else None,
                    "federated": fed_gen["scores"]["tuned"] if fed_gen else None,
                    "centralized": cen_gen["scores"]["tuned"] if cen_gen else None},
        "prompts": fed_gen["prompts"] if fed_gen else 0,
        "rounds": [{"round": a["round"], "federated": a.get("perplexity"),
                    "centralized": b.get("perplexity")}
                   for a, b in zip(fed, cen, strict=False)],
    }


def _generations(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / GENERATIONS
    return json.loads(path.read_text()) if path.is_file() else None


def render(result: dict[str, Any]) -> str:
    ppl, rouge = result["perplexity"], result["rouge_l"]
    head = f"{'model':<12} {'answer ppl':>11} {'ROUGE-L':>8}"
    lines = [head, "-" * len(head)]
    for name in ("base", "federated", "centralized"):
        r = f"{rouge[name]:.4f}" if rouge[name] is not None else "-"
        lines.append(f"{name:<12} {ppl[name]:>11.2f} {r:>8}")
    lines.append(f"answer perplexity federated / base = {ppl['federated'] / ppl['base']:.3f}, "
                 f"federated / centralized = {ppl['federated'] / ppl['centralized']:.3f}")
    if rouge["base"] is not None and rouge["federated"] is not None:
        lines.append(f"ROUGE-L federated - base = {rouge['federated'] - rouge['base']:+.4f} "
                     f"on {result['prompts']} held-out prompts")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.chat_federation",
        description="Instruction tuning on the chatterbot federation: base vs federated vs "
        "centralized at equal examples seen (answer perplexity, ROUGE-L).")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients-per-round", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128,
                        help="tokens per block: SmolLM2's default system prompt takes ~20")
    parser.add_argument("--min-examples", type=int, default=10,
                        help="devices (language x category) with fewer chats are left out")
    parser.add_argument("--prompts", type=int, default=24,
                        help="held-out prompts answered for ROUGE-L")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any further config override, applied to both runs")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="chat")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--from-runs", nargs=2, type=Path, metavar=("FEDERATED", "CENTRALIZED"),
                        help="analyse two finished runs instead of running")
    args = parser.parse_args(argv)
    federated, centralized = (tuple(args.from_runs) if args.from_runs
                              else run_pair(args))
    result = compare(federated, centralized)
    print(render(result))
    out = federated.parent / "chat_federation.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
