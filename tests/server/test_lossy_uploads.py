"""Lossy codecs through fedtune's real ClientApp and strategy, delivered in-process: the
coordinator's mean of int4 / sign1 uploads stays near the exact mean, in far fewer bytes,
and each device keeps its residual in its own Flower state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord

from client.error_feedback import RESIDUAL_KEY
from protocols.codecs import from_record, to_record
from protocols.run_config import ConfigError, RunConfig
from server.strategy import AdapterFedAvg
from simulations.loopback_grid import LoopbackGrid
from tests.server.tiny_federation import tiny_federation

NODES = [11, 22, 33, 44]


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_federation(tiny_model_dir, tmp_path_factory.mktemp("cache"),
                           learning_rate=0.05, secagg=False)


def _round(setup: dict[str, Any], codec: str, server_round: int = 1,
           grid: LoopbackGrid | None = None) -> tuple[dict[str, np.ndarray], Any, LoopbackGrid]:
    from client.app import make_client_app

    strategy = AdapterFedAvg(setup["spec"], codec=codec, weighting="uniform",
                             fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    grid = grid or LoopbackGrid(make_client_app(setup["flat"]), NODES,
                                node_config={n: {"partition-id": i} for i, n in enumerate(NODES)})
    config = ConfigRecord({"local-steps": 2, "batch-size": 2, "learning-rate": 0.05,
                           "seq-len": 16, "seed": 0})
    messages = strategy.configure_train(server_round, to_record(setup["adapter"]), config,
                                        grid)  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    assert arrays is not None, strategy.stats[server_round].rejections
    return from_record(arrays), strategy.stats[server_round], grid


@pytest.mark.measured
@pytest.mark.parametrize(("codec", "bytes_below", "error_below"),
                         # the tiny model's tensors are small: the packed record's index
                         # (a name, dtype and shape per array) weighs here, not at SmolLM2 size
                         [("bf16", 0.6, 0.01), ("int4", 0.5, 0.15), ("sign1", 0.4, 0.9)])
def test_a_lossy_round_lands_near_the_exact_mean_in_fewer_bytes(
        setup: dict[str, Any], codec: str, bytes_below: float, error_below: float) -> None:
    exact, exact_stats, _ = _round(setup, "fp32")
    got, stats, grid = _round(setup, codec)
    assert stats.accepted == 4 and stats.rejected == 0
    start = setup["adapter"]
    trained = [k for k in setup["spec"].trainable_keys]
    want = np.concatenate([(exact[k] - start[k]).ravel() for k in trained])
    mean = np.concatenate([(got[k] - start[k]).ravel() for k in trained])
    rel = float(np.linalg.norm(mean - want) / np.linalg.norm(want))
    assert rel < error_below, rel  # int4: stochastic rounding of 4 updates; sign1: 1 bit
    assert stats.bytes_up < bytes_below * exact_stats.bytes_up, (stats.bytes_up,
                                                                 exact_stats.bytes_up)
    for node in NODES:  # the residual stays in each device's own state
        assert RESIDUAL_KEY in grid.contexts[node].state.array_records
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(replies) == 4  # the upload and the metrics, nothing of the residual
    assert all(set(m.content.keys()) == {"arrays", "metrics"} for m in replies)


def test_replies_over_the_budget_are_refused_and_auto_fits_it(setup: dict[str, Any]) -> None:
    from protocols.upload_budget import upload_size
    from server.app import upload_codec
    from server.strategy import RoundStats

    shapes = {k: setup["spec"].tensors[k].shape for k in setup["spec"].trainable_keys}
    every = list(setup["spec"].tensors)  # the lossy codecs' bitmap names frozen A's too
    fp32, int8 = upload_size("fp32", shapes, every), upload_size("int8", shapes, every)
    config = RunConfig.from_nested({"security": {"secagg": False}, "federation": {
        "codec": "auto", "max_upload_bytes": int8}})
    assert upload_codec(config, setup["spec"]) == "int8"
    with pytest.raises(ConfigError, match=r"uploads \d+ bytes per device, over"):
        upload_codec(RunConfig.from_nested({"security": {"secagg": False}, "federation": {
            "codec": "fp32", "max_upload_bytes": fp32 - 1}}), setup["spec"])
    with pytest.raises(ConfigError, match="edge devices upload their dense delta"):
        upload_codec(RunConfig.from_nested({"security": {"secagg": False}, "edge": {
            "fraction": 0.5, "upload": "dense"}, "federation": {
            "codec": "auto", "max_upload_bytes": int8}}), setup["spec"])
    with pytest.raises(ConfigError, match="masked secure-aggregation upload"):
        upload_codec(RunConfig.from_nested({"federation": {"max_upload_bytes": 100}}),
                     setup["spec"])

    from client.app import make_client_app

    strategy = AdapterFedAvg(setup["spec"], codec="fp32", max_upload_bytes=fp32 - 1,
                             fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    grid = LoopbackGrid(make_client_app(setup["flat"]), NODES,
                        node_config={n: {"partition-id": i} for i, n in enumerate(NODES)})
    config_record = ConfigRecord({"local-steps": 1, "batch-size": 2, "learning-rate": 0.05,
                                  "seq-len": 16, "seed": 0})
    messages = strategy.configure_train(1, to_record(setup["adapter"]), config_record,
                                        grid)  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    stats: RoundStats = strategy.stats[1]
    assert arrays is None and stats.rejected == 4 and stats.accepted == 0
    assert all(f"upload of {fp32} bytes is over the budget of {fp32 - 1}" in r
               for r in stats.rejections)


def test_a_run_budget_picks_the_codec_for_every_round_and_refuses_the_upload_past_it(
        setup: dict[str, Any]) -> None:
    """federation.max_run_upload_bytes: auto fits train.rounds uploads in it (a device may
    be sampled every round); the coordinator refuses the reply that would take a device
    past its run total, with the totals named, and keeps counting the others."""
    from client.app import make_client_app
    from protocols.upload_budget import upload_size
    from server.app import upload_codec

    shapes = {k: setup["spec"].tensors[k].shape for k in setup["spec"].trainable_keys}
    int4 = upload_size("int4", shapes, list(setup["spec"].tensors))
    config = RunConfig.from_nested({"security": {"secagg": False}, "train": {"rounds": 3},
                                    "federation": {"codec": "auto",
                                                   "max_run_upload_bytes": 3 * int4}})
    assert upload_codec(config, setup["spec"]) == "int4"
    masked = RunConfig.from_nested({"train": {"rounds": 3}, "federation": {
        "codec": "auto", "max_run_upload_bytes": 3 * int4}})
    assert upload_codec(masked, setup["spec"]) in ("int4", "int3", "int2")

    strategy = AdapterFedAvg(setup["spec"], codec="int4", weighting="uniform",
                             max_run_upload_bytes=int4 + int4 // 2, fraction_train=1.0,
                             min_train_nodes=4, min_available_nodes=4)
    grid = LoopbackGrid(make_client_app(setup["flat"]), NODES,
                        node_config={n: {"partition-id": i} for i, n in enumerate(NODES)})
    config_record = ConfigRecord({"local-steps": 1, "batch-size": 2, "learning-rate": 0.05,
                                  "seq-len": 16, "seed": 0})
    for server_round, accepted in ((1, 4), (2, 0)):
        messages = strategy.configure_train(server_round, to_record(setup["adapter"]),
                                            config_record, grid)  # type: ignore[arg-type]
        strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        assert strategy.stats[server_round].accepted == accepted
    assert all("over the budget of" in r and "max_run_upload_bytes" in r
               for r in strategy.stats[2].rejections)
    assert set(strategy.node_upload_bytes.values()) == {int4}
