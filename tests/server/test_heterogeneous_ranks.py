"""Heterogeneous LoRA ranks through fedtune's real ClientApp and strategies, delivered
in-process (issue 16, point 3): devices of ranks 2 and 4 (the global rank) train one
adapter; the coordinator's aggregate is checked against the dense mean of each device's
product B·A, computed here from the replies themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord

from protocols import keys
from protocols.adapter_rank import modules, pad_rank, shape_at_rank
from protocols.adapter_spec import AdapterSpec
from protocols.codecs import from_record, to_record
from protocols.packing import unpack_record
from server.secagg import SecAggFedAvg
from server.strategy import AdapterFedAvg
from simulations.loopback_grid import LoopbackGrid
from tests.server.tiny_federation import tiny_federation

NODES = [11, 22, 33, 44]
R = 4  # tiny_federation's lora.r


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_federation(tiny_model_dir, tmp_path_factory.mktemp("cache"),
                           learning_rate=0.05, secagg=False)


def _grid(flat: dict[str, Any], ranks: str, **lora: Any) -> LoopbackGrid:
    from client.app import make_client_app

    settings = {**flat, "lora.device_ranks": ranks,
                **{f"lora.{k}": v for k, v in lora.items()}}
    return LoopbackGrid(make_client_app(settings), NODES,
                        node_config={n: {"partition-id": i} for i, n in enumerate(NODES)})


def _round(strategy: AdapterFedAvg, grid: LoopbackGrid, adapter: dict[str, np.ndarray],
           server_round: int = 1) -> dict[str, np.ndarray]:
    config = ConfigRecord({"local-steps": 2, "batch-size": 2, "learning-rate": 0.05,
                           "seq-len": 16, "seed": 0})
    messages = strategy.configure_train(server_round, to_record(adapter), config,
                                        grid)  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    assert arrays is not None, strategy.stats[server_round].rejections
    return from_record(arrays)


def _replies(grid: LoopbackGrid, server_round: int) -> list[tuple[dict[str, np.ndarray], int]]:
    """Each train reply's delta and the rank it says it trained."""
    out = []
    for msg in grid.received:
        if msg.metadata.message_type == "train" and msg.metadata.group_id == str(server_round):
            delta = from_record(unpack_record(msg.content.array_records[keys.ARRAYS]))
            rank = int(msg.content.metric_records[keys.METRICS].get(keys.LORA_RANK, R))
            out.append((delta, rank))
    return out


def _sampling() -> dict[str, Any]:
    return {"weighting": "uniform", "fraction_train": 1.0, "min_train_nodes": 4,
            "min_available_nodes": 4}


def test_ffa_mixed_ranks_average_exactly_and_each_device_then_gets_its_own_rank(
        plain: dict[str, Any]) -> None:
    spec, start = plain["spec"], plain["adapter"]
    strategy = AdapterFedAvg(spec, **_sampling())
    grid = _grid(plain["flat"], "2,4")
    got = _round(strategy, grid, start)
    replies = _replies(grid, 1)
    assert sorted(r for _, r in replies) == [2, 2, 4, 4]
    for delta, rank in replies:  # a rank-2 device uploads its rank-2 B's only
        assert all(v.shape[1] == rank for v in delta.values())
    full = {k: t.shape for k, t in spec.tensors.items()}
    mean = {k: np.mean([pad_rank(d, full)[k] for d, _ in replies], axis=0) for k in replies[0][0]}
    for key in mean:
        np.testing.assert_allclose(got[key] - start[key], mean[key], atol=1e-6, err_msg=key)
    # the mean of the products, exactly: A is shared
    for a_key, b_key in modules(list(spec.tensors)):
        dense = np.mean([(start[b_key][:, :r] + d[b_key]) @ start[a_key][:r]
                         for d, r in replies], axis=0)
        want = np.mean([start[b_key][:, :r] @ start[a_key][:r] for _, r in replies], axis=0)
        np.testing.assert_allclose(got[b_key] @ got[a_key] - start[b_key] @ start[a_key],
                                   dense - want, atol=1e-5)
    # round 2: the coordinator now sends each rank-2 device its rank-2 slice (fewer bytes)
    _round(strategy, grid, got, server_round=2)
    sent = {m.metadata.dst_node_id: m for m in strategy.stats[2].sent}
    for node, rank in zip(NODES, [2, 4, 2, 4], strict=True):
        adapter = from_record(unpack_record(sent[node].content.array_records[keys.ARRAYS]))
        assert all(v.shape == shape_at_rank(k, full[k], rank) for k, v in adapter.items())
    assert strategy.stats[2].bytes_down < strategy.stats[1].bytes_down


@pytest.mark.parametrize("ranks", ["1", "1,4"])
def test_plain_lora_mixed_ranks_are_the_refactorised_mean_of_products(
        plain: dict[str, Any], ranks: str) -> None:
    """Four rank-1 devices: 4 components fit the global rank 4, the product is exact; ranks
    1 and 4 (10 components): the best rank-4 approximation of the mean (FlexLoRA)."""
    start = plain["adapter"]
    spec = AdapterSpec.from_arrays(start, {})  # A trainable too
    strategy = AdapterFedAvg(spec, **_sampling())
    grid = _grid(plain["flat"], ranks, freeze_a=False)
    got = _round(strategy, grid, start)
    replies = _replies(grid, 1)
    for a_key, b_key in modules(list(spec.tensors)):
        dense = np.mean([(start[b_key][:, :r] + d[b_key]).astype(np.float64)
                         @ (start[a_key][:r] + d[a_key]) for d, r in replies], axis=0)
        u, s, vt = np.linalg.svd(dense)
        best = (u[:, :R] * s[:R]) @ vt[:R]
        scale = np.abs(dense).max()
        np.testing.assert_allclose(got[b_key].astype(np.float64) @ got[a_key], best,
                                   atol=1e-5 * scale, err_msg=a_key)
        if ranks == "1":
            np.testing.assert_allclose(best, dense, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def masked(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_federation(tiny_model_dir, tmp_path_factory.mktemp("cache"),
                           learning_rate=0.05, secagg=True)


def test_ffa_mixed_ranks_under_secure_aggregation_pad_on_the_device(
        masked: dict[str, Any]) -> None:
    """Masked vectors all have the global rank's length: rank-2 devices pad with zeros, and
    the secure mean equals the plaintext mean of the padded deltas (to fixed-point rounding)."""
    spec, start = masked["spec"], masked["adapter"]
    sampling = {"fraction_train": 1.0, "min_train_nodes": 4, "min_available_nodes": 4}
    secure = _round(SecAggFedAvg(spec, **sampling), _grid(masked["flat"], "2,4"), start)
    reference_grid = _grid({**masked["flat"], "security.secagg": False}, "2,4")
    reference = _round(AdapterFedAvg(spec, **_sampling()), reference_grid, start)
    for key in spec.trainable_keys:
        np.testing.assert_allclose(secure[key], reference[key], atol=1e-6, err_msg=key)
        assert not np.allclose(secure[key], start[key])


def test_a_devices_own_lora_rank_reaches_its_run_config_through_flower(tmp_path: Path) -> None:
    """[resources] lora_rank travels as the node config Flower parses (an integer, not a
    string) and becomes lora.device_rank on that device only."""
    from flwr.common.config import parse_config_args

    from client.node.daemon import DaemonConfig
    from client.node.supernode import node_config_arg
    from client.node_policy import apply_node_settings
    from protocols.run_config import RunConfig

    daemon = DaemonConfig(address="127.0.0.1:9093", state_dir=tmp_path, path=tmp_path,
                          insecure=True, lora_rank=4)
    parsed = parse_config_args([node_config_arg(daemon.node_config())])
    run = RunConfig.from_nested({"lora": {"r": 16, "alpha": 32.0}}).to_flat()
    config = RunConfig.from_flat(apply_node_settings(run, parsed))
    assert config.lora.device_rank == 4 and config.lora.rank_of(7) == 4
    assert config.lora.at_rank(4).alpha / 4 == 32.0 / 16


def test_a_lower_rank_claim_cannot_undo_client_dp_or_a_norm_bound(
        plain: dict[str, Any]) -> None:
    """Plain LoRA's product aggregation is bounded by no clip: under client-level DP or a
    norm bound the coordinator refuses a rank claim below R (FFA-LoRA pads and clips as
    usual, so it takes one)."""
    from flwr.app import MetricRecord

    from protocols.errors import InvalidUpdate

    claim = MetricRecord({keys.NUM_EXAMPLES: 1, keys.LORA_RANK: 2})
    trained_a = AdapterSpec.from_arrays(plain["adapter"], {})
    for bound in ({"clip_norm": 1.0}, {"max_update_norm": 5.0},
                  {"clip_norm": 1.0, "denominator": 4}):
        strategy = AdapterFedAvg(trained_a, weighting="uniform", **bound)
        with pytest.raises(InvalidUpdate, match="plain LoRA takes lower ranks only"):
            strategy.reply_rank(claim)
    assert AdapterFedAvg(plain["spec"], weighting="uniform",
                         clip_norm=1.0).reply_rank(claim) == 2
    assert AdapterFedAvg(trained_a).reply_rank(claim) == 2
