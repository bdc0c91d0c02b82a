"""Client-level DP: clipping bound, calibrated noise, ledger per round, budget stop."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from protocols.adapter_spec import AdapterSpec
from protocols.codecs import from_record, to_record
from protocols.privacy.accounting import rdp_epsilon
from protocols.privacy.ledger import PrivacyLedger, load_ledger
from protocols.validation import clip_update
from server.client_dp import ClientLevelDP
from server.strategy import AdapterFedAvg, RoundStats
from tests.measured import within

A = "m.q_proj.lora_A.weight"
B = "m.q_proj.lora_B.weight"
SHAPE_B = (400, 250)  # 100k coordinates: the noise std is estimated to ~0.3 %


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _global() -> dict[str, np.ndarray]:
    return {A: np.full((2, 3), 0.5, np.float32), B: np.zeros(SHAPE_B, np.float32)}


def _dp(sigma: float, clip: float, max_update_norm: float = 0.0, **kw: object) -> ClientLevelDP:
    spec = AdapterSpec.from_arrays(_global(), {}, frozen=frozenset({A}))
    inner = AdapterFedAvg(spec, weighting="uniform", max_update_norm=max_update_norm)
    return ClientLevelDP(inner, clip_norm=clip, noise_multiplier=sigma, clients_per_round=4,
                         ledger=PrivacyLedger(accountant="rdp", delta=1e-5), seed=0, **kw)


def _start(dp: ClientLevelDP, rnd: int, num_nodes: int = 100) -> bool:
    dp.strategy.begin_round(rnd, to_record(_global()), ConfigRecord())  # configure_train's
    return dp.begin_round(rnd, num_nodes)


def _reply(node: int, b: np.ndarray, examples: int = 10, server_round: int = 1) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train",
                      group_id=str(server_round))
    content = RecordDict({"arrays": to_record({B: b}),
                          "metrics": MetricRecord({"num-examples": examples})})
    return Message(content, reply_to=request)


def test_clip_update_bounds_the_joint_norm() -> None:
    update = {"x": np.full(4, 3.0, np.float32), "y": np.full(4, 4.0, np.float32)}  # norm 10
    clipped, norm = clip_update(update, 2.0)
    assert norm == pytest.approx(10.0)
    joint = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in clipped.values()))
    assert joint == pytest.approx(2.0, rel=1e-6)
    small, _ = clip_update({"x": np.full(4, 0.1, np.float32)}, 2.0)
    np.testing.assert_array_equal(small["x"], np.full(4, 0.1, np.float32))


def test_a_huge_update_moves_the_adapter_by_at_most_c() -> None:
    dp = _dp(sigma=0.0, clip=0.5)
    assert _start(dp, 1)
    arrays, _ = dp.aggregate_train(1, [_reply(1, np.full(SHAPE_B, 100.0, np.float32))])
    assert arrays is not None
    moved = from_record(arrays)[B] - _global()[B]
    # clipped to C = 0.5, then divided by the expected cohort (4), not by the 1 that arrived
    assert np.linalg.norm(moved.astype(np.float64)) == pytest.approx(0.5 / 4, rel=1e-5)
    assert dp.clip_fractions[1] == 1.0


@pytest.mark.measured
def test_noise_std_matches_calibration() -> None:
    sigma, clip, m = 1.3, 0.8, 4
    dp = _dp(sigma=sigma, clip=clip)
    assert _start(dp, 1)
    same = [_reply(i, np.zeros(SHAPE_B, np.float32), examples=i * 100) for i in range(1, m + 1)]
    arrays, _ = dp.aggregate_train(1, same)
    assert arrays is not None
    noise = from_record(arrays)[B].astype(np.float64)  # all updates are zero
    expected = sigma * clip / m
    # 100k samples: the std estimate's relative standard error is 1/sqrt(2N) = 0.22 %;
    # 2 % is ~9 standard errors, so this fails only if the calibration is wrong.
    within("|noise std / sigma C/m - 1|", abs(noise.std() / expected - 1), below=0.02)
    within("|noise mean| in standard errors",
           abs(noise.mean()) / (expected / np.sqrt(noise.size)), below=5)
    np.testing.assert_array_equal(from_record(arrays)[A], _global()[A])  # frozen A


def test_weights_are_uniform_and_the_sum_is_divided_by_the_expected_cohort() -> None:
    """Two of the four expected updates arrive: their sum is divided by 4, not 2 (the count
    that arrived depends on the devices; DP's noise is calibrated to the fixed 4)."""
    dp = _dp(sigma=0.0, clip=1e9)
    assert _start(dp, 1)
    arrays, _ = dp.aggregate_train(1, [_reply(1, np.full(SHAPE_B, 1.0, np.float32), 1),
                                       _reply(2, np.full(SHAPE_B, 3.0, np.float32), 1000)])
    assert arrays is not None
    np.testing.assert_allclose(from_record(arrays)[B], (1.0 + 3.0) / 4)


@pytest.mark.measured
def test_fewer_accepted_than_sampled_keeps_the_noise_of_the_expected_cohort() -> None:
    """Noise std sigma*C/m with m the expected cohort (4), also when only one of the
    sampled updates was accepted (a data-dependent count must not set the noise)."""
    sigma, clip = 1.3, 0.8
    dp = _dp(sigma=sigma, clip=clip)
    assert _start(dp, 1)
    bad = np.full(SHAPE_B, np.nan, np.float32)
    arrays, _ = dp.aggregate_train(1, [_reply(1, np.zeros(SHAPE_B, np.float32)),
                                       _reply(2, bad), _reply(3, bad)])
    assert arrays is not None and dp.strategy.stats[1].accepted == 1
    noise = from_record(arrays)[B].astype(np.float64)
    within("|noise std / sigma C/4 - 1|", abs(noise.std() / (sigma * clip / 4) - 1), below=0.02)


def test_ledger_records_each_round_and_persists(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "ledger.json"
    dp = _dp(sigma=1.1, clip=1.0, ledger_path=path)
    for rnd in (1, 2, 3):
        assert _start(dp, rnd, num_nodes=400)
        dp.aggregate_train(rnd, [_reply(1, np.zeros(SHAPE_B, np.float32), server_round=rnd)])
    expected = rdp_epsilon(noise_multiplier=1.1, sample_rate=4 / 400, steps=3, delta=1e-5)
    assert dp.ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    assert load_ledger(path).epsilon() == pytest.approx(expected, rel=1e-9)


@pytest.mark.measured
def test_a_round_with_no_accepted_update_releases_the_noise_alone_and_spends() -> None:
    """Every update rejected (or an empty Poisson sample): the round still releases the
    global adapter plus noise and is accounted for — skipping it would tell an observer the
    sample was empty, which the subsampled Gaussian analysis does not allow for."""
    sigma, clip = 1.0, 1.0
    dp = _dp(sigma=sigma, clip=clip)
    assert _start(dp, 1)
    bad = np.full(SHAPE_B, np.nan, np.float32)
    arrays, _ = dp.aggregate_train(1, [_reply(1, bad)])
    assert arrays is not None
    moved = from_record(arrays)[B].astype(np.float64) - _global()[B]
    within("|noise std / sigma C/4 - 1|", abs(moved.std() / (sigma * clip / 4) - 1), below=0.02)
    assert [e.round for e in dp.ledger.history] == [1]
    np.testing.assert_array_equal(from_record(arrays)[A], _global()[A])


def test_distributed_dp_round_without_a_sum_spends_nothing() -> None:
    """Under secure aggregation the devices add the noise: a round that recovered no sum
    has nothing to release and spends nothing."""
    dp = _dp(sigma=1.0, clip=1.0, distributed=True)
    assert _start(dp, 1)
    bad = np.full(SHAPE_B, np.nan, np.float32)
    assert dp.aggregate_train(1, [_reply(1, bad)]) == (None, None)
    assert dp.ledger.history == []


def test_budget_stops_before_it_is_exceeded() -> None:
    one_round = rdp_epsilon(noise_multiplier=1.0, sample_rate=4 / 100, steps=1, delta=1e-5)
    two_rounds = rdp_epsilon(noise_multiplier=1.0, sample_rate=4 / 100, steps=2, delta=1e-5)
    dp = _dp(sigma=1.0, clip=1.0, epsilon_budget=(one_round + two_rounds) / 2)
    assert _start(dp, 1)
    dp.aggregate_train(1, [_reply(1, np.zeros(SHAPE_B, np.float32))])
    assert not _start(dp, 2)
    assert dp.stopped_at == 2
    assert dp.ledger.epsilon() <= dp.epsilon_budget
    assert dp.aggregate_train(
        2, [_reply(1, np.zeros(SHAPE_B, np.float32), server_round=2)]) == (None, None)


def test_example_weighted_inner_strategy_is_refused() -> None:
    spec = AdapterSpec.from_arrays(_global(), {})
    with pytest.raises(ValueError, match="weighting='uniform'"):
        ClientLevelDP(AdapterFedAvg(spec), clip_norm=1.0, noise_multiplier=1.0,
                      clients_per_round=2, ledger=PrivacyLedger(accountant="rdp", delta=1e-5))


def test_an_update_beyond_the_coordinators_bound_is_rejected_not_clipped() -> None:
    dp = _dp(sigma=0.0, clip=1.0, max_update_norm=5.0)
    assert _start(dp, 1)
    honest = np.full(SHAPE_B, 0.01, np.float32)  # norm 3.16: above C, below the bound
    huge = np.full(SHAPE_B, 100.0, np.float32)
    arrays, _ = dp.aggregate_train(1, [_reply(1, honest), _reply(2, huge)])
    assert arrays is not None
    stats = dp.strategy.stats[1]
    assert (stats.accepted, stats.rejected) == (1, 1)
    assert "exceeds the coordinator's bound 5" in stats.rejections[0]
    out = from_record(arrays)[B]  # only the honest update, clipped to C = 1, over m = 4
    assert np.linalg.norm(out) == pytest.approx(1.0 / 4, rel=1e-5)


def test_a_round_whose_devices_failed_releases_and_spends_nothing() -> None:
    """Sampled devices failed (an error reply: a lost worker, a device offline): nothing is
    released or accounted, so the round can run again with a fresh sample
    (server.round_retry) and only the attempt that releases spends epsilon."""
    from flwr.app import Error

    dp = _dp(sigma=1.0, clip=1.0)
    assert _start(dp, 1)
    request = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="1")
    failed = Message(Error(code=1, reason="worker lost"), reply_to=request)
    dp.strategy.stats[1] = RoundStats(sampled=1, sent=[request])  # as configure_train does
    assert dp.aggregate_train(1, [failed]) == (None, None)
    assert dp.ledger.history == [] and dp.strategy.stats[1].failed == 1
