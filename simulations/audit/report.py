"""The audit's outputs: ``audit.json`` (every measurement), ``audit.md`` (the tables) and
``audit.png`` (recovery, recall and membership inference against their baselines, per batch
size).

Every reconstruction figure stands beside two baselines measured in the same run, since
uniform chance is far too weak a yardstick for natural text: the *frequency prior* (the
same figure for a guess made from public text alone — the most frequent tokens — without
looking at any update) and the *decoy* (the attack's own output scored against another
device's text, outside the cohort: what the attack "recovers" of text it never saw).
Position-exact token recovery is the primary figure; token-set recall is reported too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = "fedtune-audit/2"
ATTACKS = {"bag": "bag-of-tokens (analytic)", "opt": "optimization (TAG/DLG)",
           "mia": "membership inference (loss ratio)"}
#: The figures averaged over seeds per grid cell.
SUMMARY_FIELDS = ("recovery", "recovery_prior", "recovery_decoy", "recovery_chance", "recall",
                  "recall_prior", "recall_decoy", "recall_chance", "auc", "tpr_at_1pct_fpr",
                  "auc_other_devices", "members", "non_members")


@dataclass(frozen=True)
class Measurement:
    """One attack on one target in one grid cell."""

    attack: str  # a key of ATTACKS
    batch_size: int
    local_steps: int
    safeguards: bool
    seed: int
    client: str
    recovery: float | None  # share of positions recovered exactly (optimisation attack only)
    recovery_chance: float | None
    recall: float | None  # share of the batch's distinct tokens recovered
    recall_chance: float | None
    distinct_tokens: int
    target_norm: float
    seconds: float
    recovery_prior: float | None = None  # the most frequent public token at every position
    recovery_decoy: float | None = None  # the attack's output scored on another device
    recall_prior: float | None = None  # as many of the most frequent public tokens
    recall_decoy: float | None = None
    auc: float | None = None  # membership inference vs the target's own unused blocks
    tpr_at_1pct_fpr: float | None = None
    auc_other_devices: float | None = None  # vs blocks of devices outside the cohort
    members: int = 0
    non_members: int = 0


def summarize(rows: Sequence[Measurement]) -> list[dict[str, Any]]:
    """Mean over seeds per (attack, batch, steps, safeguards), in grid order."""
    groups: dict[tuple[str, int, int, bool], list[Measurement]] = {}
    for row in rows:
        groups.setdefault((row.attack, row.batch_size, row.local_steps, row.safeguards),
                          []).append(row)
    out = []
    for (attack, batch, steps, guarded), group in sorted(groups.items()):
        def mean(name: str, group: list[Measurement] = group) -> float | None:
            values = [getattr(r, name) for r in group if getattr(r, name) is not None]
            return sum(values) / len(values) if values else None

        out.append({"attack": attack, "batch_size": batch, "local_steps": steps,
                    "safeguards": guarded, "seeds": len(group),
                    **{k: mean(k) for k in SUMMARY_FIELDS}})
    return out


def write_json(path: Path, *, settings: dict[str, Any], vocab_size: int,
               rows: Sequence[Measurement], wall_seconds: float) -> None:
    doc = {"format": FORMAT, "settings": settings, "vocab_size": vocab_size,
           "wall_seconds": wall_seconds, "summary": summarize(rows),
           "measurements": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _pct(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0 %"
    return f"{100 * value:.3g} %" if value >= 1e-3 else f"{100 * value:.1e} %"


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The reconstruction table (each figure beside its frequency-prior and decoy
    baselines), then the membership-inference table."""
    lines = ["| attack | batch | local steps | safeguards | token recovery | prior | decoy "
             "| token-set recall | prior | decoy | chance |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in (r for r in summary if r["attack"] != "mia"):
        lines.append(
            f"| {ATTACKS[row['attack']]} | {row['batch_size']} | {row['local_steps']} | "
            f"{'on' if row['safeguards'] else 'off'} | {_pct(row['recovery'])} | "
            f"{_pct(row['recovery_prior'])} | {_pct(row['recovery_decoy'])} | "
            f"{_pct(row['recall'])} | {_pct(row['recall_prior'])} | "
            f"{_pct(row['recall_decoy'])} | {_pct(row['recall_chance'])} |")
    mia = [r for r in summary if r["attack"] == "mia"]
    if mia:
        lines += ["", "| membership inference | batch | local steps | safeguards | members "
                      "| non-members (own) | ROC AUC | TPR at 1 % FPR | AUC vs other devices |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for row in mia:
            auc = "–" if row["auc"] is None else f"{row['auc']:.3f}"
            lines.append(
                f"| loss ratio | {row['batch_size']} | {row['local_steps']} | "
                f"{'on' if row['safeguards'] else 'off'} | {row['members']:.0f} | "
                f"{row['non_members']:.0f} | {auc} | {_pct(row['tpr_at_1pct_fpr'])} | "
                f"{row['auc_other_devices']:.3f} |")
    return "\n".join(lines)


def write_markdown(path: Path, *, summary: Sequence[dict[str, Any]], settings: dict[str, Any],
                   wall_seconds: float) -> None:
    guards = settings["safeguards"]
    text = [
        "# fedtune leakage audit",
        "",
        f"Model `{settings['model']}` ({settings['layers_note']}), vocabulary "
        f"{settings['vocab_size']}, {settings['seq_len']} tokens per sequence, LoRA r="
        f"{settings['lora']['r']} on `{settings['lora']['target_modules']}`, AdamW lr "
        f"{settings['learning_rate']}, {settings['seeds']} target client(s) per cell, "
        f"{wall_seconds:.0f} s.",
        "",
        f"Safeguards off: the coordinator sees one client's raw update ({settings['off_adapter']})."
        f" Safeguards on: FFA-LoRA, clip to C={guards['clip_norm']}, Gaussian noise "
        f"sigma={guards['noise_multiplier']} (std sigma*C on the aggregate, added by the "
        f"{guards['noise_at']}), secure aggregation over m={guards['cohort']} clients.",
        "",
        "Token recovery (the primary figure): share of positions recovered exactly. Token-set "
        "recall: share of the batch's distinct tokens recovered; for the bag-of-tokens attack "
        "with top-K, K = number of distinct tokens, for the optimization attack the distinct "
        "tokens of its reconstruction. Baselines measured in the same run: *prior* = the same "
        "figure for a guess from public text alone (the most frequent tokens of devices "
        "outside the cohort; at every position for recovery), *decoy* = the attack's output "
        "scored against a device outside the cohort, *chance* = uniform guesses. An attack "
        "leaks only where it beats prior and decoy.",
        "",
        "Membership inference: blocks scored by loss(fine-tuned adapter) / loss(adapter "
        "before the round); members = the target's training blocks, non-members = the "
        "target's own blocks it did not train on (same speaker: the primary figure), and, "
        "for comparison, blocks of devices outside the cohort (which also measures telling "
        "speakers apart). The fine-tuned adapter is the target's own with safeguards off, "
        "the next global adapter (the secure mean; noise-free with --noise-at coordinator) "
        "with them on. ROC AUC 0.5 = guessing; few members make the figures coarse.",
        "",
        markdown_table(summary),
        "",
    ]
    path.write_text("\n".join(text), encoding="utf-8")


def write_plot(path: Path, summary: Sequence[dict[str, Any]]) -> None:
    """Two panels (bag recall, optimisation recovery) against batch size, on a log scale so
    chance (grey dotted) stays visible; a zero is drawn at the panel's floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), dpi=110)
    panels = (("bag", "recall", "bag-of-tokens recall"),
              ("opt", "recovery", "optimization attack: token recovery"))
    _membership_panel(axes[2], [r for r in summary if r["attack"] == "mia"])
    for ax, (attack, metric, title) in zip(axes[:2], panels, strict=True):
        rows = [r for r in summary if r["attack"] == attack]
        if not rows:
            continue
        floor = min(r[f"{metric}_chance"] for r in rows) / 10
        series = sorted({(r["local_steps"], r["safeguards"]) for r in rows})
        for steps, guarded in series:
            sel = sorted((r for r in rows if (r["local_steps"], r["safeguards"]) ==
                          (steps, guarded)), key=lambda r: r["batch_size"])
            xs = [r["batch_size"] for r in sel]
            label = (f"{steps} step{'s' if steps > 1 else ''}, "
                     f"safeguards {'on' if guarded else 'off'}")
            ax.plot(xs, [max(r[metric], floor) for r in sel], marker="o",
                    linestyle="--" if guarded else "-", label=label)
            ax.plot(xs, [r[f"{metric}_chance"] for r in sel], color="grey", linestyle=":",
                    linewidth=1.5)
            if not guarded and all(r.get(f"{metric}_prior") is not None for r in sel):
                ax.plot(xs, [max(r[f"{metric}_prior"], floor) for r in sel], color="black",
                        linestyle="-.", linewidth=1)
        batches = sorted({r["batch_size"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_ylim(floor / 1.5, 1.5)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{metric} (0 drawn at {floor:.1g})")
        ax.set_title(title + "\n(grey dotted: chance; black dash-dot: frequency prior)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _membership_panel(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """ROC AUC of the loss-ratio attack against batch size (0.5 = guessing)."""
    ax.set_title("membership inference: ROC AUC\n(grey dotted: guessing)", fontsize=9)
    if not rows:
        return
    for steps, guarded in sorted({(r["local_steps"], r["safeguards"]) for r in rows}):
        sel = sorted((r for r in rows if (r["local_steps"], r["safeguards"]) ==
                      (steps, guarded)), key=lambda r: r["batch_size"])
        ax.plot([r["batch_size"] for r in sel],
                [r["auc"] if r["auc"] is not None else float("nan") for r in sel], marker="o",
                linestyle="--" if guarded else "-",
                label=f"{steps} step{'s' if steps > 1 else ''}, safeguards "
                      f"{'on' if guarded else 'off'}")
    batches = sorted({r["batch_size"] for r in rows})
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(0, 1)
    ax.set_xlabel("batch size")
    ax.set_ylabel("ROC AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
