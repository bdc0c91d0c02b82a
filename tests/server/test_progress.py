"""The terminal's round lines: what each says, and plain lines (no ANSI codes) off a TTY."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

from server.metrics_log import append_metrics
from server.progress import describe_round, round_progress


def test_each_round_line_says_clients_failures_and_the_score() -> None:
    assert describe_round({"round": 0, "perplexity": 167.39}, 10) == (
        "round 0/10 (before training), perplexity 167.4")
    assert describe_round({"round": 3, "clients": 2, "failed": 1, "rejected": 0,
                           "perplexity": 78.94, "epsilon": 1.234, "round_s": 31.2}, 10) == (
        "round 3/10: 2 clients, 1 failed, 0 rejected, perplexity 78.9, epsilon 1.23, 31 s")
    federated = {"round": 2, "clients": 3, "failed": 0, "rejected": 0,
                 "fed_eval_loss_weighted": math.log(50.0), "fed_eval_devices": 7}
    assert describe_round(federated, 4) == (
        "round 2/4: 3 clients, 0 failed, 0 rejected, device perplexity 50.0 (token-weighted, "
        "7 devices)")


def test_off_a_terminal_every_round_is_one_plain_line(tmp_path: Path) -> None:
    stream = io.StringIO()  # not a TTY: what a file, CI or a journal gets
    with round_progress("deployed", 2, stream=stream) as box:
        append_metrics(tmp_path, {"round": 0, "perplexity": 100.0})
        box.append(tmp_path)
        time.sleep(1.5)
        append_metrics(tmp_path, {"round": 1, "clients": 2, "failed": 0, "rejected": 0,
                                  "perplexity": 90.0, "round_s": 3.0})
        append_metrics(tmp_path, {"round": 2, "clients": 1, "failed": 1, "rejected": 0,
                                  "perplexity": 85.0, "round_s": 4.0})
    assert stream.getvalue().splitlines() == [
        "deployed: round 0/2 (before training), perplexity 100.0",
        "deployed: round 1/2: 2 clients, 0 failed, 0 rejected, perplexity 90.0, 3 s",
        "deployed: round 2/2: 1 clients, 1 failed, 0 rejected, perplexity 85.0, 4 s",
    ]
    assert "\x1b[" not in stream.getvalue()


def test_progress_can_be_switched_off(tmp_path: Path) -> None:
    stream = io.StringIO()
    with round_progress("federated", 1, enabled=False, stream=stream) as box:
        box.append(tmp_path)
        append_metrics(tmp_path, {"round": 0, "perplexity": 1.0})
    assert stream.getvalue() == ""


def test_devices_evaluate_only_when_asked_or_when_nothing_else_can() -> None:
    from protocols.run_config import RunConfig
    from server.app import federated_eval_fraction

    def config(**eval_: object) -> RunConfig:
        privacy = {"client_dp": bool(eval_.pop("dp", False))}
        return RunConfig.from_nested({"eval": eval_, "privacy": privacy})

    assert federated_eval_fraction(config(), central=True) == 0.0  # eval.path scores it
    assert federated_eval_fraction(config(), central=False) == 1.0  # no eval.path
    assert federated_eval_fraction(config(central=False), central=False) == 0.0  # off
    assert federated_eval_fraction(config(fraction_clients=0.25), central=True) == 0.25
    assert federated_eval_fraction(config(dp=True), central=False) == 0.0  # not under DP
