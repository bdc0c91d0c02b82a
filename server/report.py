"""The run report: an HTML page with PNG plots, base / centralized / federated side by side.

A report is regenerated from the run folder alone (``fedtune report RUN``), so a baseline
run made later can be added to an earlier federated run's report.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics
from server.run_dir import latest_comparable, read_run_info

REPORT = "report.html"
GENERATIONS = "generations.json"
_SAMPLE_KEYS = ("prompt", "reference", "base", "tuned")  # a generation sample's texts

log = logging.getLogger(__name__)


def _plot(path: Path, draw: Any, *, integer_x: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    draw(ax)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _final(rows: list[dict[str, Any]]) -> float | None:
    values = [r["perplexity"] for r in rows if "perplexity" in r]
    return values[-1] if values else None


def _exp(loss: Any) -> float | None:
    """Perplexity of a mean token loss (inf past float range); None if it is no number."""
    if not isinstance(loss, int | float) or isinstance(loss, bool):
        return None
    return math.exp(loss) if loss < 700 else math.inf


def _device_ppl(row: dict[str, Any]) -> list[float]:
    """A row's per-device held-out perplexities, finite ones only (a log axis shows no inf)."""
    values = [_exp(v) for v in row.get("fed_eval_losses") or []]
    return [v for v in values if v is not None and math.isfinite(v)]


def _read_generations(run_dir: Path) -> dict[str, Any] | None:
    """``generations.json`` of a run (base vs tuned generation quality), checked; None when
    the run has none, or, with a warning naming the file, when it cannot be read."""
    path = run_dir / GENERATIONS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        scores, samples = data["scores"], data["samples"]
        prompts = data["prompts"]
        if not isinstance(prompts, int) or isinstance(prompts, bool):
            raise ValueError(f"prompts is {prompts!r}, not a count")
        if not isinstance(scores, dict):
            raise ValueError("scores is not an object")
        for model in ("base", "tuned"):
            if not isinstance(scores[model], int | float) or isinstance(scores[model], bool):
                raise ValueError(f"scores.{model} is {scores[model]!r}, not a number")
        if not isinstance(samples, list) or not all(
                isinstance(s, dict) and all(isinstance(s[k], str) for k in _SAMPLE_KEYS)
                for s in samples):
            raise ValueError(f"samples must be a list of objects with string {_SAMPLE_KEYS}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        log.warning("skipping the generation section: %s is malformed (%s)", path, what)
        return None
    return data


def write_report(run_dir: Path, *, runs_dir: Path | None = None) -> Path:
    """Write ``report.html`` and its plots into ``run_dir``; return the page's path."""
    info = read_run_info(run_dir)
    rows = read_metrics(run_dir)
    runs_dir = runs_dir or run_dir.parent
    other_kind = "centralized" if info["kind"] == "federated" else "federated"
    other_dir = latest_comparable(runs_dir, other_kind, info["fingerprint"])
    mixed = info["kind"] == "federated" and info.get("edge_fraction", 0.0) > 0
    torch_only_dir = (latest_comparable(runs_dir, "federated", info["fingerprint"],
                                        edge_fraction=0.0) if mixed else None)
    torch_only = read_metrics(torch_only_dir) if torch_only_dir else []
    other_rows = read_metrics(other_dir) if other_dir else []
    series = {info["kind"]: rows, other_kind: other_rows}
    fed, cen = series["federated"], series["centralized"]
    base = next((r["perplexity"] for r in rows if r["round"] == 0 and "perplexity" in r), None)

    plots = []
    fed_eval_ppl = [(r["round"], v) for r in rows
                    if (v := _exp(r.get("fed_eval_loss_weighted"))) is not None]
    if any("perplexity" in r for r in rows):
        def draw_ppl(ax: Any) -> None:
            curves = [("federated", fed, "o-"), ("centralized", cen, "s--")]
            if mixed:
                curves[0] = ("federated, with edge clients", fed, "o-")
                curves.append(("federated, torch clients only", torch_only, "^-."))
            for label, data, style in curves:
                pts = [(r["round"], r["perplexity"]) for r in data if "perplexity" in r]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=label)
            if base is not None:
                ax.axhline(base, color="grey", linestyle=":", label=f"base model ({base:.1f})")
            ax.set_xlabel("round (centralized: same examples seen)")
            ax.set_ylabel("held-out perplexity")
            ax.legend()

        _plot(run_dir / "perplexity.png", draw_ppl)
        plots.append(("Held-out perplexity per round", "perplexity.png"))
    elif fed_eval_ppl:  # no central evaluation: the devices' own held-out data
        def draw_fed_ppl(ax: Any) -> None:
            ax.plot(*zip(*fed_eval_ppl, strict=True), "o-",
                    label="federated evaluation (token-weighted)")
            ax.set_xlabel("round")
            ax.set_ylabel("held-out perplexity")
            ax.legend()

        _plot(run_dir / "perplexity.png", draw_fed_ppl)
        plots.append(("Held-out perplexity per round", "perplexity.png"))
    dev_rows = [r for r in rows if _device_ppl(r)]
    if dev_rows:
        ends = dev_rows[:1] + dev_rows[1:][-1:]  # the first and the last round evaluated

        def draw_devices(ax: Any) -> None:
            import numpy as np
            from matplotlib.ticker import LogFormatter

            rng = np.random.default_rng(0)  # the same jitter each time the report is made
            data = [_device_ppl(r) for r in ends]
            positions = list(range(1, len(ends) + 1))
            ax.boxplot(data, positions=positions, widths=0.5, showfliers=False,
                       medianprops={"color": "black"})
            for pos, r, values in zip(positions, ends, data, strict=True):
                ax.scatter(pos + rng.uniform(-0.15, 0.15, len(values)), values, s=16,
                           alpha=0.7, zorder=3,
                           label=f"round {r['round']} ({len(values)} devices)")
            ax.set_xticks(positions, [f"round {r['round']}" for r in ends])
            ax.set_xlim(0.4, len(ends) + 0.6)
            ax.set_yscale("log")
            plain = LogFormatter(labelOnlyBase=False)  # 20, 30, 40 rather than 2×10¹ ...
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.set_ylabel("held-out perplexity per device")
            ax.legend()

        _plot(run_dir / "devices.png", draw_devices, integer_x=False)
        plots.append(("Held-out perplexity per device, first and last round evaluated",
                      "devices.png"))
    train_rows = [r for r in fed if r["round"] > 0 and "bytes_up" in r]
    budget = _upload_budget(run_dir)
    if info["kind"] == "federated" and train_rows:
        def draw_bytes(ax: Any) -> None:
            rounds = [r["round"] for r in train_rows]
            ax.bar([x - 0.2 for x in rounds], [r["bytes_down"] / 1e6 for r in train_rows],
                   width=0.4, label="down (coordinator → clients)")
            ax.bar([x + 0.2 for x in rounds], [r["bytes_up"] / 1e6 for r in train_rows],
                   width=0.4, label="up (clients → coordinator)")
            top = max(max(r["bytes_down"], r["bytes_up"]) for r in train_rows) / 1e6
            if budget:  # the budget of every device sampled that round
                allowed = [budget * r.get("sampled", r["clients"]) / 1e6 for r in train_rows]
                ax.step([x + 0.2 for x in rounds], allowed, where="mid", color="tab:red",
                        linestyle="--", label="upload budget (max_upload_bytes × sampled)")
                top = max(top, *allowed)
            ax.set_xlabel("round")
            ax.set_ylabel("MB per round")
            ax.set_ylim(0, top * 1.4 or 1)  # room for the legend above the bars
            ax.legend(loc="upper right")

        def draw_clients(ax: Any) -> None:
            rounds = [r["round"] for r in train_rows]
            ax.bar(rounds, [r["clients"] for r in train_rows], label="aggregated")
            rejected = [r.get("rejected", 0) + r.get("failed", 0) for r in train_rows]
            ax.bar(rounds, rejected, bottom=[r["clients"] for r in train_rows],
                   label="rejected or failed", color="tab:red")
            ax.set_xlabel("round")
            ax.set_ylabel("clients")
            top = max(r["sampled"] for r in train_rows)
            ax.set_ylim(0, top * 1.4 or 1)
            ax.legend(loc="upper right")

        _plot(run_dir / "bytes.png", draw_bytes)
        _plot(run_dir / "clients.png", draw_clients)
        plots += [("Bytes per round", "bytes.png"), ("Clients per round", "clients.png")]
    kind_rows = [r for r in train_rows if r.get("bytes_up_by_kind")]
    if mixed and kind_rows:
        def draw_kinds(ax: Any) -> None:
            rounds = [r["round"] for r in kind_rows]
            for shift, kind in ((-0.2, "torch"), (0.2, "edge")):
                per_client = [r["bytes_up_by_kind"].get(kind, 0)
                              / max(r["clients_by_kind"].get(kind, 0), 1) for r in kind_rows]
                ax.bar([x + shift for x in rounds], per_client, width=0.4,
                       label=f"{kind} client")
            ax.set_yscale("log")
            ax.set_xlabel("round")
            ax.set_ylabel("bytes up per client (log)")
            ax.legend(loc="upper right")

        _plot(run_dir / "bytes_by_kind.png", draw_kinds)
        plots.append(("Bytes up per client by kind", "bytes_by_kind.png"))
    dp_rows = [r for r in rows if r.get("epsilon") is not None]
    if dp_rows:
        def draw_eps(ax: Any) -> None:
            ax.plot([r["round"] for r in dp_rows], [r["epsilon"] for r in dp_rows], "o-",
                    color="tab:purple", label=f"ε spent (δ = {dp_rows[-1]['delta']:g})")
            ax.set_xlabel("round")
            ax.set_ylabel("ε (client-level)")
            ax.legend()

        _plot(run_dir / "epsilon.png", draw_eps)
        plots.append(("Privacy spent per round", "epsilon.png"))

    def cell(v: float | None) -> str:
        return "—" if v is None or math.isnan(v) else f"{v:.2f}"

    table = [("base model", base), ("centralized", _final(cen)), ("federated", _final(fed))]
    if mixed:
        table[2] = (f"federated, with edge clients ({info['edge_fraction']:.0%} of devices)",
                    _final(fed))
        table.append(("federated, torch clients only", _final(torch_only)))
    config_file = run_dir / "config.toml"
    config_text = config_file.read_text() if config_file.exists() else ""
    page = [
        "<!doctype html><meta charset='utf-8'><title>fedtune run "
        f"{html.escape(info['name'])}</title>",
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "td,th{padding:4px 12px;text-align:right}th:first-child,td:first-child{text-align:left}"
        "</style>",
        f"<h1>fedtune {html.escape(info['kind'])} run {html.escape(info['name'])}</h1>",
        "<h2>Held-out perplexity (lower is better)</h2><table>",
        "<tr><th>model</th><th>perplexity</th></tr>",
        *[f"<tr><td>{n}</td><td>{cell(v)}</td></tr>" for n, v in table],
        "</table>",
    ]
    summary_rows = [r for r in rows if "fed_eval_loss_mean" in r]
    if summary_rows:
        last = summary_rows[-1]
        devices = last.get("fed_eval_devices", len(last.get("fed_eval_losses") or []))
        page += [
            f"<h2>Federated evaluation on the devices' held-out data (round {last['round']})"
            "</h2><table>",
            "<tr><th>devices</th><th>mean perplexity</th><th>token-weighted</th>"
            "<th>worst decile</th></tr>",
            f"<tr><td>{devices}</td><td>{cell(_exp(last.get('fed_eval_loss_mean')))}</td>"
            f"<td>{cell(_exp(last.get('fed_eval_loss_weighted')))}</td>"
            f"<td>{cell(_exp(last.get('fed_eval_loss_worst_decile')))}</td></tr>",
            "</table>",
        ]
    if dp_rows:
        last = dp_rows[-1]
        stopped = last.get("dp_stopped_at")
        page.append(
            f"<p>Client-level DP: ε = {last['epsilon']:.3f} at δ = {last['delta']:g} after "
            f"round {last['round']}"
            + (f"; training stopped before round {stopped} to stay within the budget"
               if stopped else "")
            + ".</p>"
        )
    if other_dir is None:
        page.append(
            f"<p>No finished {other_kind} run with the same model, data, adapter and budget "
            f"was found in {html.escape(str(runs_dir))}; run <code>fedtune simulate"
            f"{' --centralized' if other_kind == 'centralized' else ''}</code> with the same "
            "config, then <code>fedtune report</code> on this run.</p>"
        )
    if mixed and torch_only_dir is None:
        page.append(
            "<p>No finished federated run with the same model, data, adapter and budget and "
            "no edge clients was found: run the same config with <code>--set "
            "edge.fraction=0</code>, then <code>fedtune report</code> on this run.</p>")
    if kind_rows:
        page.append("<h2>Bytes up per client per round, by kind (all rounds)</h2><table>"
                    "<tr><th>kind</th><th>client uploads</th><th>rounds with this kind</th>"
                    "<th>mean bytes up per client per round</th></tr>")
        for kind, uploads, rounds, mean in _bytes_by_kind(kind_rows):
            page.append(f"<tr><td>{kind}</td><td>{uploads}</td><td>{rounds}</td>"
                        f"<td>{mean:,.0f}</td></tr>")
        page.append("</table>")
    for title, file in plots:
        page.append(f"<h2>{title}</h2><img src='{file}' alt='{title}'>")
    generations = _read_generations(run_dir)
    if generations is not None:
        page += _generation_section(generations, info["kind"], other_kind,
                                    _read_generations(other_dir) if other_dir else None)
    page.append(f"<h2>Per-round metrics</h2><pre>{html.escape(_rows_text(rows))}</pre>")
    page.append(f"<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>")
    out = run_dir / REPORT
    out.write_text("\n".join(page), encoding="utf-8")
    return out


def _generation_section(gen: dict[str, Any], kind: str, other_kind: str,
                        other: dict[str, Any] | None) -> list[str]:
    """Scores of base and tuned models on held-out prompts, then the side-by-side samples."""
    metric = html.escape(str(gen.get("metric", "rougeL-f1")))
    scores = [("base model", gen["scores"]["base"]), (kind, gen["scores"]["tuned"])]
    if other is not None:
        label = other_kind if other["prompts"] == gen["prompts"] else (
            f"{other_kind} (on {other['prompts']} prompts)")
        scores.append((label, other["scores"]["tuned"]))
    tokens = gen.get("max_new_tokens")
    part = [
        f"<h2>Generation (ROUGE-L on {gen['prompts']} held-out prompts)</h2>",
        "<p>Each model's continuation of a held-out prompt, scored against the held-out "
        "text that follows it"
        + (f" (at most {html.escape(str(tokens))} new tokens)" if tokens else "")
        + "; higher is better.</p><table>",
        f"<tr><th>model</th><th>{metric}</th></tr>",
        *[f"<tr><td>{html.escape(n)}</td><td>{v:.3f}</td></tr>" for n, v in scores],
        "</table>",
    ]
    if gen["samples"]:
        part += [
            "<style>table.samples td,table.samples th{text-align:left;vertical-align:top;"
            "white-space:pre-wrap}</style><table class='samples'>",
            "<tr><th>prompt</th><th>reference</th><th>base</th>"
            f"<th>tuned ({html.escape(kind)})</th></tr>",
            *["<tr>" + "".join(f"<td>{html.escape(s[k])}</td>" for k in _SAMPLE_KEYS)
              + "</tr>" for s in gen["samples"]],
            "</table>",
        ]
    return part


def _upload_budget(run_dir: Path) -> int:
    """The run's ``federation.max_upload_bytes`` (0: none, or no readable config)."""
    from protocols.config_file import load_config
    from protocols.run_config import ConfigError

    try:
        return load_config(run_dir / "config.toml").federation.max_upload_bytes
    except (ConfigError, OSError):
        return 0


def _rows_text(rows: list[dict[str, Any]]) -> str:
    keep = ("round", "perplexity", "train_loss", "clients", "rejected", "bytes_up",
            "bytes_down", "round_s", "wall_s", "fed_eval_devices", "fed_eval_loss_weighted")
    return "\n".join(
        json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                    for k, v in r.items() if k in keep}) for r in rows
    )


def _bytes_by_kind(rows: list[dict[str, Any]]) -> list[tuple[str, int, int, float]]:
    """Per client kind: accepted uploads, rounds it took part in, mean bytes per upload.

    Over all rounds, not the last: which kinds a round samples is random, so one round can
    hold a single kind."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        for kind, count in row["clients_by_kind"].items():
            entry = totals.setdefault(kind, [0, 0, 0])
            entry[0] += int(count)
            entry[1] += 1
            entry[2] += int(row["bytes_up_by_kind"].get(kind, 0))
    return [(kind, uploads, rounds, nbytes / max(uploads, 1))
            for kind, (uploads, rounds, nbytes) in sorted(totals.items())]
