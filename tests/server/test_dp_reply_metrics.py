"""What a device lets out beside its update under client-level DP: nothing of its own.

The real ClientApp answers the real coordinator over an in-process grid; every reply's
metrics are read as the coordinator receives them. Under ``privacy.client_dp`` a device
reports one update and its size — no loss, example count or timing, which DP does not
cover — with and without secure aggregation; without DP it reports its training loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from protocols import keys
from protocols.run_config import RunConfig
from simulations.loopback_grid import LoopbackGrid

NODES = [101, 202, 303]


class RecordingGrid(LoopbackGrid):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_metrics: list[dict[str, Any]] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.train_metrics += [dict(r.content.metric_records[keys.METRICS])
                                   for r in replies if not r.has_error()]
        return replies


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _run(tiny_model_dir: Path, cache: Path, run_dir: Path, *, client_dp: bool,
         secagg: bool) -> list[dict[str, Any]]:
    from client.app import make_client_app
    from server.app import run_coordinator
    from simulations.runner import check_inputs, flower_run_config

    config = RunConfig.from_nested({
        "model": {"source": str(tiny_model_dir)},
        "data": {"min_examples": 5, "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"rounds": 1, "clients_per_round": 3, "local_steps": 1, "batch_size": 2,
                  "seq_len": 16},
        "eval": {"max_blocks": 2, "batch_size": 4, "generate": 0},
        "privacy": {"client_dp": client_dp, "client_sampling": "fixed"},
        "security": {"secagg": secagg},
    })
    run_dir.mkdir()
    flat = flower_run_config(check_inputs(config, cache), run_dir)
    grid = RecordingGrid(make_client_app(flat), NODES,
                         node_config={n: {"partition-id": i} for i, n in enumerate(NODES)})
    run_coordinator(grid, flat)  # type: ignore[arg-type]
    assert len(grid.train_metrics) == 3
    return grid.train_metrics


@pytest.mark.parametrize("secagg", [False, True], ids=["server-noise", "secagg"])
def test_under_client_dp_a_device_reports_only_one_update_and_its_size(
        tiny_model_dir: Path, mini_cache: Path, tmp_path: Path, secagg: bool) -> None:
    for metrics in _run(tiny_model_dir, mini_cache, tmp_path / "dp", client_dp=True,
                        secagg=secagg):
        assert set(metrics) == {keys.NUM_EXAMPLES, keys.UPLOAD_BYTES}
        assert metrics[keys.NUM_EXAMPLES] == 1


def test_without_dp_a_device_reports_its_loss_and_examples(
        tiny_model_dir: Path, mini_cache: Path, tmp_path: Path) -> None:
    for metrics in _run(tiny_model_dir, mini_cache, tmp_path / "plain", client_dp=False,
                        secagg=False):
        assert keys.TRAIN_LOSS in metrics and metrics[keys.NUM_EXAMPLES] > 1
