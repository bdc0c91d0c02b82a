"""The run report: an HTML page with PNG plots, base / centralized / federated side by side.

A report is regenerated from the run folder alone (``fedtune report RUN``), so a baseline
run made later can be added to an earlier federated run's report.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from server.metrics_log import read_metrics
from server.run_dir import latest_comparable, read_run_info

REPORT = "report.html"


def _plot(path: Path, draw: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    draw(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _final(rows: list[dict[str, Any]]) -> float | None:
    values = [r["perplexity"] for r in rows if "perplexity" in r]
    return values[-1] if values else None


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
    train_rows = [r for r in fed if r["round"] > 0 and "bytes_up" in r]
    if info["kind"] == "federated" and train_rows:
        def draw_bytes(ax: Any) -> None:
            rounds = [r["round"] for r in train_rows]
            ax.bar([x - 0.2 for x in rounds], [r["bytes_down"] / 1e6 for r in train_rows],
                   width=0.4, label="down (coordinator → clients)")
            ax.bar([x + 0.2 for x in rounds], [r["bytes_up"] / 1e6 for r in train_rows],
                   width=0.4, label="up (clients → coordinator)")
            ax.set_xlabel("round")
            ax.set_ylabel("MB per round")
            top = max(max(r["bytes_down"], r["bytes_up"]) for r in train_rows) / 1e6
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
    page.append(f"<h2>Per-round metrics</h2><pre>{html.escape(_rows_text(rows))}</pre>")
    page.append(f"<h2>Configuration</h2><pre>{html.escape(config_text)}</pre>")
    out = run_dir / REPORT
    out.write_text("\n".join(page), encoding="utf-8")
    return out


def _rows_text(rows: list[dict[str, Any]]) -> str:
    keep = ("round", "perplexity", "train_loss", "clients", "rejected", "bytes_up",
            "bytes_down", "round_s", "wall_s")
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
