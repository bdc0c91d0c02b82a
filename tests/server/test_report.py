"""The run report: per-device held-out results, generation quality, and runs without a
central evaluation, from run folders made the way the runners make them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from protocols.run_config import RunConfig
from server import report
from server.metrics_log import append_metrics
from server.report import write_report
from server.run_dir import new_run_dir

PNG = b"\x89PNG\r\n\x1a\n"
LOSSES = {0: [2.9, 3.1, 3.0, 3.4], 1: [2.5, 2.6, 2.4, 3.3], 2: [2.1, 2.3, 2.2, 3.2]}
SAMPLE = {"prompt": "ARIEL.\nFull fathom five <thy father> lies;",
          "reference": "Of his bones are coral made;\nthose are pearls",
          "base": "a & b < c", "tuned": "Of his bones are coral made"}
GENERATIONS = {"metric": "rougeL-f1", "prompts": 24, "max_new_tokens": 48,
               "scores": {"base": 0.12, "tuned": 0.31}, "samples": [SAMPLE]}


def fed_eval(losses: list[float]) -> dict[str, Any]:
    """The fields ``server.strategy.FederatedEval.row`` logs (equal token counts here)."""
    mean = sum(losses) / len(losses)
    return {"fed_eval_devices": len(losses), "fed_eval_loss_mean": mean,
            "fed_eval_loss_weighted": mean - 0.05,
            "fed_eval_loss_worst_decile": max(losses), "fed_eval_losses": losses}


def federated_rows(*, with_fed_eval: bool = True,
                   with_perplexity: bool = True) -> list[dict[str, Any]]:
    rows = []
    for rnd in range(3):
        row: dict[str, Any] = {"round": rnd}
        if with_perplexity:
            row["perplexity"] = 30.0 - 5 * rnd
        if rnd > 0:
            row.update({"train_loss": 3.0 - rnd / 2, "clients": 4, "sampled": 4,
                        "rejected": 0, "bytes_up": 1e5, "bytes_down": 2e5})
        if with_fed_eval:
            row.update(fed_eval(LOSSES[rnd]))
        rows.append(row)
    return rows


def make_run(runs: Path, kind: str, name: str, rows: list[dict[str, Any]],
             generations: object = None) -> Path:
    """A finished run folder, as ``new_run_dir`` leaves it, with ``rows`` logged."""
    with new_run_dir(runs, kind, RunConfig.from_nested({}), name=name) as work:
        for row in rows:
            append_metrics(work, row)
        if isinstance(generations, str):
            (work / "generations.json").write_text(generations)
        elif generations is not None:
            (work / "generations.json").write_text(json.dumps(generations))
    return runs / name


@pytest.fixture
def draws(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Each plot's drawing function by file name (the PNGs are still written), so a test
    can redraw a plot on its own axes and read its labels."""
    seen: dict[str, Any] = {}
    real = report._plot

    def recording(path: Path, draw: Any, **kwargs: Any) -> None:
        seen[path.name] = draw
        real(path, draw, **kwargs)

    monkeypatch.setattr(report, "_plot", recording)
    return seen


def redraw(draw: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw(ax)
    plt.close(fig)
    return ax


def test_device_distribution_plot_and_table(tmp_path: Path, draws: dict[str, Any]) -> None:
    run = make_run(tmp_path / "runs", "federated", "fed", federated_rows())
    page = write_report(run).read_text()

    assert (run / "devices.png").read_bytes().startswith(PNG)
    assert "<img src='devices.png'" in page
    ax = redraw(draws["devices.png"])
    assert ax.get_ylabel() == "held-out perplexity per device"
    assert ax.get_yscale() == "log"
    assert ax.get_legend_handles_labels()[1] == ["round 0 (4 devices)", "round 2 (4 devices)"]
    plotted = sorted(float(y) for c in ax.collections for y in c.get_offsets()[:, 1])
    assert plotted == pytest.approx(sorted(math.exp(v) for v in LOSSES[0] + LOSSES[2]))

    last = fed_eval(LOSSES[2])
    assert "Federated evaluation on the devices' held-out data (round 2)" in page
    assert (f"<tr><td>4</td><td>{math.exp(last['fed_eval_loss_mean']):.2f}</td>"
            f"<td>{math.exp(last['fed_eval_loss_weighted']):.2f}</td>"
            f"<td>{math.exp(last['fed_eval_loss_worst_decile']):.2f}</td></tr>") in page
    assert f"{math.exp(3.2):.2f}" == "24.53"  # the worst decile of 4 devices: the worst one
    assert "<td>24.53</td>" in page


def test_rows_without_device_results_render_as_before(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", "federated", "fed", federated_rows(with_fed_eval=False))
    page = write_report(run).read_text()

    assert not (run / "devices.png").exists()
    assert (run / "perplexity.png").read_bytes().startswith(PNG)
    assert "devices.png" not in page
    assert "Federated evaluation" not in page
    assert "Generation" not in page
    assert "<tr><td>federated</td><td>20.00</td></tr>" in page


def test_generation_section_with_comparable_centralized_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    central = dict(GENERATIONS, scores={"base": 0.12, "tuned": 0.27})
    make_run(runs, "centralized", "cen", federated_rows(with_fed_eval=False), central)
    run = make_run(runs, "federated", "fed", federated_rows(), GENERATIONS)
    page = write_report(run, runs_dir=runs).read_text()

    assert "<h2>Generation (ROUGE-L on 24 held-out prompts)</h2>" in page
    assert "<tr><th>model</th><th>rougeL-f1</th></tr>" in page
    assert "<tr><td>base model</td><td>0.120</td></tr>" in page
    assert "<tr><td>federated</td><td>0.310</td></tr>" in page
    assert "<tr><td>centralized</td><td>0.270</td></tr>" in page
    assert "at most 48 new tokens" in page
    # The sample, escaped, its newlines kept (shown by white-space: pre-wrap).
    assert ("<tr><td>ARIEL.\nFull fathom five &lt;thy father&gt; lies;</td>"
            "<td>Of his bones are coral made;\nthose are pearls</td>"
            "<td>a &amp; b &lt; c</td><td>Of his bones are coral made</td></tr>") in page
    assert "<thy father>" not in page
    assert "white-space:pre-wrap" in page


def test_generation_section_without_comparable_generations(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "federated", "fed", federated_rows())  # comparable, no generations.json
    run = make_run(runs, "centralized", "cen", federated_rows(with_fed_eval=False),
                   dict(GENERATIONS, prompts=10))
    page = write_report(run, runs_dir=runs).read_text()

    assert "<h2>Generation (ROUGE-L on 10 held-out prompts)</h2>" in page
    assert "<tr><td>centralized</td><td>0.310</td></tr>" in page
    assert "<tr><td>federated</td><td>0" not in page  # no score row for the other run


def test_comparable_run_on_other_prompts_is_labelled(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "centralized", "cen", federated_rows(with_fed_eval=False),
             dict(GENERATIONS, prompts=12, scores={"base": 0.1, "tuned": 0.2}))
    run = make_run(runs, "federated", "fed", federated_rows(), GENERATIONS)
    page = write_report(run, runs_dir=runs).read_text()

    assert "<tr><td>centralized (on 12 prompts)</td><td>0.200</td></tr>" in page


@pytest.mark.parametrize("text", [
    "{not json",
    json.dumps({k: v for k, v in GENERATIONS.items() if k != "scores"}),
    json.dumps(dict(GENERATIONS, scores={"base": 0.12})),
    json.dumps(dict(GENERATIONS, samples=[{"prompt": "p"}])),
    json.dumps([1, 2]),
], ids=["bad-json", "no-scores", "no-tuned", "bad-sample", "not-object"])
def test_malformed_generations_skip_the_section(tmp_path: Path, text: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    run = make_run(tmp_path / "runs", "federated", "fed", federated_rows(), text)
    with caplog.at_level(logging.WARNING, logger="server.report"):
        page = write_report(run).read_text()

    assert "Generation" not in page
    assert "Federated evaluation on the devices' held-out data" in page  # the rest is there
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(run / "generations.json") in m for m in warnings), warnings


def test_malformed_comparable_generations_drop_only_its_row(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs = tmp_path / "runs"
    cen = make_run(runs, "centralized", "cen", federated_rows(with_fed_eval=False), "[")
    run = make_run(runs, "federated", "fed", federated_rows(), GENERATIONS)
    with caplog.at_level(logging.WARNING, logger="server.report"):
        page = write_report(run, runs_dir=runs).read_text()

    assert "<tr><td>federated</td><td>0.310</td></tr>" in page
    assert "<tr><td>centralized</td><td>0" not in page
    assert any(str(cen / "generations.json") in r.getMessage() for r in caplog.records)


def test_run_with_only_federated_evaluation(tmp_path: Path, draws: dict[str, Any]) -> None:
    run = make_run(tmp_path / "runs", "federated", "fed",
                   federated_rows(with_perplexity=False))
    page = write_report(run).read_text()

    assert (run / "perplexity.png").read_bytes().startswith(PNG)
    assert (run / "devices.png").read_bytes().startswith(PNG)
    ax = redraw(draws["perplexity.png"])
    assert ax.get_legend_handles_labels()[1] == ["federated evaluation (token-weighted)"]
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 2]
    assert list(line.get_ydata()) == pytest.approx(
        [math.exp(fed_eval(LOSSES[r])["fed_eval_loss_weighted"]) for r in range(3)])
    assert "<tr><td>federated</td><td>—</td></tr>" in page
    assert "Federated evaluation on the devices' held-out data (round 2)" in page


def test_run_without_any_evaluation_skips_the_perplexity_plot(tmp_path: Path) -> None:
    rows = federated_rows(with_fed_eval=False, with_perplexity=False)
    run = make_run(tmp_path / "runs", "federated", "fed", rows)
    page = write_report(run).read_text()

    assert not (run / "perplexity.png").exists()
    assert not (run / "devices.png").exists()
    assert (run / "bytes.png").read_bytes().startswith(PNG)
    assert "perplexity.png" not in page


def test_single_evaluated_round_gives_one_distribution(tmp_path: Path,
                                                        draws: dict[str, Any]) -> None:
    rows = federated_rows(with_fed_eval=False)
    rows[1].update(fed_eval(LOSSES[1]))
    run = make_run(tmp_path / "runs", "federated", "fed", rows)
    write_report(run)

    ax = redraw(draws["devices.png"])
    assert ax.get_legend_handles_labels()[1] == ["round 1 (4 devices)"]


def test_the_bytes_plot_draws_the_upload_budget(tmp_path: Path) -> None:
    """With federation.max_upload_bytes set, bytes.png carries the budget line (a different
    picture from the same rows without it); an unreadable config just leaves it out."""
    from protocols.config_file import to_toml
    from protocols.run_config import RunConfig
    from server.report import _upload_budget

    plain = make_run(tmp_path / "a", "federated", "fed", federated_rows(with_fed_eval=False))
    budgeted = make_run(tmp_path / "b", "federated", "fed", federated_rows(with_fed_eval=False))
    config = RunConfig.from_nested({"security": {"secagg": False},
                                    "federation": {"max_upload_bytes": 4096}})
    (budgeted / "config.toml").write_text(to_toml(config))
    assert _upload_budget(budgeted) == 4096 and _upload_budget(plain) == 0
    write_report(plain)
    write_report(budgeted)
    assert (budgeted / "bytes.png").read_bytes().startswith(PNG)
    assert (budgeted / "bytes.png").read_bytes() != (plain / "bytes.png").read_bytes()
