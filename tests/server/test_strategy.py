"""AdapterFedAvg: example-weighted averaging, and bad replies rejected without harm."""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from protocols.adapter_spec import AdapterSpec
from protocols.codecs import ClientUpdate, RoundContext, from_record, get_codec, to_record
from protocols.seed_updates import SeedUpdate
from server.strategy import AdapterFedAvg, RunningSum


@pytest.fixture(autouse=True)
def server_identity() -> None:
    """Messages are stamped with the sending task's identity, which a ServerApp has at run
    time; outside a run it is set by hand, as Flower's own simulation entry point does."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


A = "m.q_proj.lora_A.weight"
B = "m.q_proj.lora_B.weight"


B_BYTES = 3 * 2 * 4  # B in float32


def _global() -> dict[str, np.ndarray]:
    return {A: np.full((2, 3), 0.5, np.float32), B: np.zeros((3, 2), np.float32)}


def _strategy(frozen: frozenset[str] = frozenset()) -> AdapterFedAvg:
    strategy = AdapterFedAvg(AdapterSpec.from_arrays(_global(), {}, frozen=frozen))
    strategy.begin_round(1, to_record(_global()), ConfigRecord())  # what configure_train does
    return strategy


def _reply(node: int, tensors: dict[str, np.ndarray], examples: int, *, server_round: int = 1,
           **extra: float) -> Message:
    """A client that ends the round holding ``tensors``: it uploads their delta from the
    round's global adapter, as client.app does."""
    request = Message(RecordDict(), dst_node_id=node, message_type="train",
                      group_id=str(server_round))
    start = _global()
    delta = {k: (v - start[k]).astype(v.dtype) if start.get(k, v).shape == v.shape else v
             for k, v in tensors.items()}  # a malformed tensor is sent as it is
    content = RecordDict(
        {
            "arrays": to_record(delta),
            "metrics": MetricRecord({"num-examples": examples, **extra}),
        }
    )
    return Message(content, reply_to=request)


def test_the_running_sum_is_the_weighted_mean_or_the_sum_over_a_fixed_denominator() -> None:
    rng = np.random.default_rng(1)
    ups = [({A: rng.normal(size=(2, 3)).astype(np.float32)}, n) for n in (1, 3, 6)]
    running = RunningSum()
    for update, weight in ups:
        running.add(update, weight)
    expected = np.average(np.stack([u[A] for u, _ in ups]), axis=0, weights=[1, 3, 6])
    np.testing.assert_allclose(running.mean()[A], expected, rtol=1e-6)
    total = sum(w * u[A].astype(np.float64) for u, w in ups)
    np.testing.assert_allclose(running.mean(denominator=4)[A], total / 4, rtol=1e-6)


def test_aggregate_train_weights_by_examples() -> None:
    strategy = _strategy()
    one = {A: np.ones((2, 3), np.float32), B: np.ones((3, 2), np.float32)}
    four = {A: np.full((2, 3), 4, np.float32), B: np.full((3, 2), 4, np.float32)}
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(1, one, 1, **{"train-loss": 2.0}), _reply(2, four, 3, **{"train-loss": 1.0})]
    )
    assert arrays is not None and metrics is not None
    out = from_record(arrays)
    np.testing.assert_allclose(out[A], np.full((2, 3), (1 * 1 + 4 * 3) / 4))
    assert metrics["num-examples"] == 4
    assert metrics["train-loss"] == pytest.approx((2.0 * 1 + 1.0 * 3) / 4)
    assert strategy.stats[1].accepted == 2
    assert strategy.stats[1].bytes_up > 2 * (6 + 6) * 4


def test_frozen_tensors_are_kept_from_the_global_adapter() -> None:
    strategy = _strategy(frozen=frozenset({A}))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, {B: np.ones((3, 2), np.float32)}, 2)])
    assert arrays is not None
    out = from_record(arrays)
    np.testing.assert_array_equal(out[A], _global()[A])
    np.testing.assert_array_equal(out[B], np.ones((3, 2)))


def test_bad_replies_are_rejected_logged_and_do_not_touch_the_aggregate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = _strategy()
    good = {A: np.ones((2, 3), np.float32), B: np.ones((3, 2), np.float32)}
    nan = {**good, B: np.full((3, 2), np.nan, np.float32)}
    wrong_shape = {**good, A: np.ones((3, 3), np.float32)}
    failed = Message(Error(code=0, reason="client crashed"),
                     reply_to=Message(RecordDict(), dst_node_id=9, message_type="train",
                                      group_id="3"))
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, _ = strategy.aggregate_train(
            3, [_reply(1, good, 5, server_round=3), _reply(7, nan, 5, server_round=3),
                _reply(8, wrong_shape, 500, server_round=3), failed]
        )
    assert arrays is not None
    np.testing.assert_array_equal(from_record(arrays)[A], good[A])  # only node 1
    stats = strategy.stats[3]
    assert (stats.accepted, stats.rejected, stats.failed) == (1, 2, 1)
    text = caplog.text
    assert f"rejected update from node 7: `{B}`: contains NaN or Inf" in text
    assert f"rejected update from node 8: `{A}`: expected shape (2, 3), got (3, 3)" in text
    assert "node 9 failed: client crashed" in text


def test_all_bad_leaves_global_unchanged() -> None:
    strategy = _strategy()
    bad = {A: np.ones((2, 3), np.float32)}  # B missing
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, bad, 3)])
    assert arrays is None and metrics is None  # Flower's loop keeps the previous arrays


def test_extra_records_are_refused() -> None:
    strategy = _strategy()
    reply = _reply(1, _global(), 3)
    reply.content["notes"] = MetricRecord({"x": 1.0})
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is None
    assert "unexpected records ['notes']" in strategy.stats[1].rejections[0]


def test_a_reply_from_another_round_is_refused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = _strategy()
    fresh = {A: np.ones((2, 3), np.float32), B: np.ones((3, 2), np.float32)}
    late = {A: np.full((2, 3), 9, np.float32), B: np.full((3, 2), 9, np.float32)}
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, _ = strategy.aggregate_train(
            4, [_reply(1, fresh, 5, server_round=4), _reply(2, late, 5, server_round=3)])
    assert arrays is not None
    np.testing.assert_array_equal(from_record(arrays)[A], fresh[A])
    assert (strategy.stats[4].accepted, strategy.stats[4].rejected) == (1, 1)
    assert "node 2: a reply to round 3 arrived in round 4 (late or replayed)" in caplog.text


def test_an_update_beyond_the_norm_bound_is_rejected(caplog: pytest.LogCaptureFixture) -> None:
    strategy = AdapterFedAvg(AdapterSpec.from_arrays(_global(), {}), max_update_norm=2.0)
    strategy._global = _global()
    near = {A: _global()[A] + 0.1, B: np.full((3, 2), 0.1, np.float32)}
    far = {A: _global()[A] + 1.0, B: np.ones((3, 2), np.float32)}  # norm sqrt(12) > 2
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, _ = strategy.aggregate_train(1, [_reply(1, near, 5), _reply(2, far, 5)])
    assert arrays is not None
    np.testing.assert_allclose(from_record(arrays)[B], near[B])
    assert "node 2: update norm 3.464 exceeds the coordinator's bound 2" in caplog.text


def test_failures_are_counted_under_the_real_node_ids(caplog: pytest.LogCaptureFixture) -> None:
    """A node that answers with an error, as the SuperLink answers for an unreachable node
    (the reply's source is not the node), and a node that never answers are both counted as
    failed, each logged with the id of the node that was asked."""
    from server.strategy import RoundStats

    strategy = _strategy()
    sent = [Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
            for node in (11, 22, 33)]
    for i, msg in enumerate(sent):  # what a grid's push does
        msg.metadata.__dict__["_message_id"] = f"id-{i}"
    strategy.stats[1] = RoundStats(sampled=3, sent=sent)
    unreachable = Message(Error(code=3, reason="node unavailable"), reply_to=sent[1])
    unreachable.metadata.__dict__["_src_node_id"] = 0  # written by the SuperLink, not node 22
    good = _reply(11, {**_global(), B: np.ones((3, 2), np.float32)}, 4)
    good.metadata.__dict__["_reply_to_message_id"] = "id-0"
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, _ = strategy.aggregate_train(1, [good, unreachable])
    stats = strategy.stats[1]
    assert arrays is not None and stats.accepted == 1 and stats.failed == 2
    assert "node 22 failed: node unavailable" in caplog.text
    assert "node 33 failed: no train reply before the timeout" in caplog.text


def test_replies_are_folded_in_as_they_arrive_so_memory_does_not_grow_with_the_cohort() -> None:
    """Streaming aggregation (issue 18, point 2): each reply is decoded, checked, added to
    the running sum and dropped. Replies made on demand (as a grid that yields them would
    deliver them): the traced peak of a round of 40 one-megabyte updates is that of a round
    of 5, where keeping the decoded updates would hold 8x as many. (Flower's ``Message``
    objects hold reference cycles, which only the cyclic collector frees; the generator
    collects before each reply, as a grid that releases what it delivered would.)"""
    import gc
    import tracemalloc

    big = {A: np.zeros((512, 512), np.float32), B: np.zeros((512, 512), np.float32)}
    spec = AdapterSpec.from_arrays(big, {}, frozen=frozenset({A}))

    def peak(n: int) -> tuple[int, np.ndarray]:
        strategy = AdapterFedAvg(spec, weighting="uniform")
        strategy.begin_round(1, to_record(big), ConfigRecord())

        def replies():  # type: ignore[no-untyped-def]
            for i in range(n):
                gc.collect()
                request = Message(RecordDict(), dst_node_id=100 + i, message_type="train",
                                  group_id="1")
                delta = {B: np.full((512, 512), float(i), np.float32)}
                yield Message(RecordDict({"arrays": to_record(delta),
                                          "metrics": MetricRecord({"num-examples": 1})}),
                              reply_to=request)
        tracemalloc.start()
        arrays, _ = strategy.aggregate_train(1, replies())
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert arrays is not None and strategy.stats[1].accepted == n
        return top, from_record(arrays)[B]

    small, mean_small = peak(5)
    large, mean_large = peak(40)
    assert mean_small[0, 0] == 2.0 and mean_large[0, 0] == 19.5  # the means themselves
    assert large < 1.3 * small, (small, large)  # a 1 MB update more would already be +10 %


def _edge_round(combine: str) -> tuple[AdapterFedAvg, Message, SeedUpdate]:
    """A round with edge instructions (lr, steps, seed codec) and one forward-only reply."""
    from protocols import keys
    from protocols.seed_updates import SEED_CODEC_NAME, layout_id, trainable_shapes

    start = {A: np.full((2, 3), 0.5, np.float32), B: np.full((3, 2), 0.25, np.float32)}
    spec = AdapterSpec.from_arrays(start, {}, frozen=frozenset({A}))
    strategy = AdapterFedAvg(spec, edge_combine=combine)
    strategy.begin_round(1, to_record(start), ConfigRecord({
        keys.EDGE_LEARNING_RATE: 0.5, keys.EDGE_LOCAL_STEPS: 4, keys.EDGE_CODEC: SEED_CODEC_NAME,
        keys.EDGE_SUBSPACE: "components"}))
    update = SeedUpdate(base_round=1, seeds=np.array([3, 4], np.uint64),
                        scalars=np.array([0.5, -0.25], np.float32),
                        layout=layout_id(trainable_shapes(spec), "components"))
    request = Message(RecordDict(), dst_node_id=9, message_type="train", group_id="1")
    record = get_codec(SEED_CODEC_NAME).encode(ClientUpdate({}, update), RoundContext({}))
    reply = Message(RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": 3, keys.EDGE_CLIENT: 1.0})}), reply_to=request)
    return strategy, reply, update


@pytest.mark.parametrize("combine", ["average", "add", "exclude"])
def test_edge_steps_are_averaged_or_added_to_the_backprop_mean(combine: str) -> None:
    """'add': the replayed edge mean is added to the torch mean, so a small edge step does
    not shrink the torch step; 'average': one example-weighted mean (FedAvg); 'exclude':
    the torch devices alone (the baseline)."""
    from protocols.seed_updates import apply_seed_updates

    strategy, edge, update = _edge_round(combine)
    start = strategy.current_global
    edge_delta = apply_seed_updates(start, update.pairs(), spec=strategy.spec,
                                    learning_rate=0.5, subspace="components")[B] - start[B]
    torch_delta = np.full((3, 2), 0.1, np.float32)
    request = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="1")
    torch_reply = Message(RecordDict({"arrays": to_record({B: torch_delta}),
                                      "metrics": MetricRecord({"num-examples": 3})}),
                          reply_to=request)
    arrays, _ = strategy.aggregate_train(1, [torch_reply, edge])
    assert arrays is not None
    moved = from_record(arrays)[B] - start[B]
    expected = {"add": torch_delta + edge_delta, "exclude": torch_delta,
                "average": (torch_delta + edge_delta) / 2}[combine]
    np.testing.assert_allclose(moved, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(edge_delta).max() > 0.01  # the components step moved B
    assert strategy.stats[1].accepted == 2
    assert strategy.stats[1].clients_by_kind == {"torch": 1, "edge": 1}


def test_a_claimed_edge_device_with_a_dense_upload_is_averaged_not_added() -> None:
    """Only what the coordinator replayed is added: a dense upload that claims to be from an
    edge device is averaged with the rest, so the claim buys no extra weight."""
    from protocols import keys

    strategy, _, _ = _edge_round("add")
    start = strategy.current_global
    replies = []
    for node, value, claim in ((5, 0.2, {}), (6, 0.4, {keys.EDGE_CLIENT: 1.0})):
        request = Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
        replies.append(Message(RecordDict({
            "arrays": to_record({B: np.full((3, 2), value, np.float32)}),
            "metrics": MetricRecord({"num-examples": 1, **claim})}), reply_to=request))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    # averaged: 0.3; had the claim been trusted, 0.2 + 0.4 = 0.6
    np.testing.assert_allclose(from_record(arrays)[B] - start[B], 0.3, rtol=1e-6)


def test_edge_combine_is_checked() -> None:
    spec = AdapterSpec.from_arrays(_global(), {})
    with pytest.raises(ValueError, match="edge_combine must be"):
        AdapterFedAvg(spec, edge_combine="sum")
    with pytest.raises(ValueError, match="client-level DP"):
        AdapterFedAvg(spec, edge_combine="add", weighting="uniform", denominator=4)


def test_the_last_step_is_the_change_between_sent_adapters_and_travels_for_trajectory() -> None:
    """edge.subspace = 'trajectory': the coordinator remembers the global adapter's last
    change (zero before any; kept through a round that changed nothing), sends it with each
    train instruction of such a round only, and replays an edge reply along it."""
    from flwr.clientapp import ClientApp

    from protocols import keys
    from protocols.packing import unpack_record
    from protocols.seed_updates import (
        SEED_CODEC_NAME,
        apply_seed_updates,
        layout_id,
        trainable_shapes,
    )
    from simulations.loopback_grid import LoopbackGrid

    spec = AdapterSpec.from_arrays(_global(), {}, frozen=frozenset({A}))
    strategy = AdapterFedAvg(spec, edge_combine="add")
    config = ConfigRecord({keys.EDGE_LEARNING_RATE: 2.0, keys.EDGE_LOCAL_STEPS: 4,
                           keys.EDGE_CODEC: SEED_CODEC_NAME, keys.EDGE_SUBSPACE: "trajectory"})
    g0 = {A: np.full((2, 3), 0.5, np.float32), B: np.full((3, 2), 0.1, np.float32)}
    g1 = {**g0, B: np.array([[0.3, 0.1], [0.2, -0.1], [0.1, 0.7]], np.float32)}
    strategy.begin_round(1, to_record(g0), config)
    first = strategy._context.last_step
    assert first is not None and set(first) == {B} and not first[B].any()
    grid = LoopbackGrid(ClientApp(), [11, 12])
    messages = list(strategy.configure_train(2, to_record(g1), config, grid))  # type: ignore[arg-type]
    step = strategy._context.last_step
    assert step is not None and step[B].tobytes() == (g1[B] - g0[B]).tobytes()
    for msg in messages:
        sent = from_record(unpack_record(msg.content.array_records[keys.LAST_STEP]))
        assert set(sent) == {B} and sent[B].tobytes() == step[B].tobytes()
    update = SeedUpdate(base_round=2, seeds=np.array([5, 6], np.uint64),
                        scalars=np.array([-0.25, 0.125], np.float32),
                        layout=layout_id(trainable_shapes(spec), "trajectory"))
    record = get_codec(SEED_CODEC_NAME).encode(ClientUpdate({}, update), RoundContext({}))
    reply = Message(RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": 3, keys.EDGE_CLIENT: 1.0})}), reply_to=messages[0])
    still = Message(RecordDict({"arrays": to_record({B: np.zeros((3, 2), np.float32)}),
                                "metrics": MetricRecord({"num-examples": 3})}),
                    reply_to=messages[1])  # a torch device whose update is zero
    arrays, _ = strategy.aggregate_train(2, [reply, still])
    assert arrays is not None and strategy.stats[2].accepted == 2
    expected = apply_seed_updates(g1, update.pairs(), spec=spec, learning_rate=2.0,
                                  subspace="trajectory", last_step=step)
    assert from_record(arrays)[B].tobytes() == expected[B].tobytes()
    moved = expected[B] - g1[B]
    s = float(np.sum(moved * step[B]) / np.sum(step[B] ** 2))
    assert abs(s) > 0.1  # s·Δ, s ≠ 0, logged per edge device
    assert strategy.stats[2].along_last_step == pytest.approx([s], rel=1e-5)
    # nothing changed: the step is kept; the torch device is no longer sent it
    edge_node, torch_node = (m.metadata.dst_node_id for m in messages)
    messages = list(strategy.configure_train(3, to_record(g1), config, grid))  # type: ignore[arg-type]
    kept = strategy._context.last_step
    assert kept is not None and kept[B].tobytes() == step[B].tobytes()
    assert {m.metadata.dst_node_id: keys.LAST_STEP in m.content.array_records
            for m in messages} == {edge_node: True, torch_node: False}
    assert strategy.stats[3].bytes_down < strategy.stats[2].bytes_down
    plain = AdapterFedAvg(spec)
    messages = list(plain.configure_train(1, to_record(g0), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert all(keys.LAST_STEP not in m.content.array_records for m in messages)


def _judged_round(judge_losses: dict[int, object], multiples: tuple[float, ...] = (0, 1, 2, 3)
                  ) -> tuple[AdapterFedAvg, Any, dict[str, np.ndarray], Any]:
    """One round of a line-searching coordinator with an edge device (node 11) and a torch
    device (node 12): node 11's line-search answer is ``judge_losses[11]`` (a list of
    losses, an Exception to fail with, or a MetricRecord as it is)."""
    from flwr.clientapp import ClientApp

    from protocols import keys
    from simulations.loopback_grid import LoopbackGrid

    app = ClientApp()

    @app.query("line_search")
    def judge(msg: Message, context: Any) -> Message:
        answer = judge_losses[context.node_id]
        if isinstance(answer, Exception):
            raise answer
        record = answer if isinstance(answer, MetricRecord) else MetricRecord(
            {keys.LINE_SEARCH_LOSSES: answer})
        return Message(RecordDict({keys.METRICS: record}), reply_to=msg)

    spec = AdapterSpec.from_arrays(_global(), {}, frozen=frozenset({A}))
    strategy = AdapterFedAvg(spec, line_search=multiples, line_search_blocks=3)
    grid = LoopbackGrid(app, [11, 12], errors_as_replies=True)
    config = ConfigRecord({keys.SEQ_LEN: 16})
    messages = list(strategy.configure_train(1, to_record(_global()), config, grid))  # type: ignore[arg-type]
    by_node = {m.metadata.dst_node_id: m for m in messages}
    edge = {B: np.full((3, 2), 0.3, np.float32)}
    torch = {B: np.full((3, 2), 0.1, np.float32)}
    replies = [
        Message(RecordDict({"arrays": to_record(edge), "metrics": MetricRecord(
            {"num-examples": 1, keys.EDGE_CLIENT: 1.0})}), reply_to=by_node[11]),
        Message(RecordDict({"arrays": to_record(torch), "metrics": MetricRecord(
            {"num-examples": 1})}), reply_to=by_node[12]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return strategy, grid, from_record(arrays), strategy.stats[1]


def test_the_line_search_applies_the_multiple_the_edge_devices_score_lowest() -> None:
    """edge.line_search: the round's aggregated step u (here the mean of 0.3 and 0.1) is
    sent with the round's adapter to its edge devices only, and θ + η·u is applied at the
    multiple with the lowest loss they report."""
    from protocols import keys
    from protocols.packing import unpack_record

    strategy, grid, out, stats = _judged_round({11: [4.0, 3.5, 3.2, 3.4]})
    u = np.full((3, 2), 0.2, np.float32)
    np.testing.assert_array_equal(out[B], (np.float32(2) * u).astype(np.float32))
    np.testing.assert_array_equal(out[A], _global()[A])
    assert (stats.line_search_multiple, stats.line_search_judges) == (2.0, 1)
    asked = [m for m in grid.sent if m.metadata.message_type == keys.LINE_SEARCH_MESSAGE]
    assert [m.metadata.dst_node_id for m in asked] == [11]  # not the torch device
    content = asked[0].content
    np.testing.assert_array_equal(
        from_record(unpack_record(content.array_records[keys.STEP]))[B], u)
    assert from_record(unpack_record(content.array_records[keys.ARRAYS]))[B].tobytes() == \
        _global()[B].tobytes()
    cfg = content.config_records[keys.CONFIG]
    assert (cfg[keys.LINE_SEARCH], cfg[keys.LINE_SEARCH_BLOCKS], cfg[keys.SEQ_LEN]) == \
        ([0.0, 1.0, 2.0, 3.0], 3, 16)
    assert strategy.stats[1].bytes_down > 0


@pytest.mark.parametrize(("answer", "log_says"), [
    (RuntimeError("no data"), "failed in line_search"),
    ([3.0, 2.0], "expected a list of 4 losses"),
    ([3.0, float("nan"), 1.0, 2.0], "not finite|finite number"),
    (MetricRecord({"line-search-losses": [4.0, 3.0, 2.0, 1.0], "train-loss": 1.0}),
     "unexpected metric keys"),
])
def test_a_failed_or_malformed_line_search_answer_leaves_the_step_as_aggregated(
    answer: object, log_says: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        _, _, out, stats = _judged_round({11: answer})
    np.testing.assert_allclose(out[B], 0.2, rtol=1e-6)  # η = 1: the step as aggregated
    assert stats.line_search_multiple is None
    assert re.search(log_says, caplog.text), caplog.text
    assert "applied as it is" in caplog.text


def test_a_tie_goes_to_the_multiple_nearest_the_step_as_aggregated() -> None:
    _, _, out, stats = _judged_round({11: [2.0, 2.0, 2.0, 3.0]})
    assert stats.line_search_multiple == 1.0
    np.testing.assert_allclose(out[B], 0.2, rtol=1e-6)


def test_the_line_search_is_refused_under_client_dp() -> None:
    spec = AdapterSpec.from_arrays(_global(), {})
    with pytest.raises(ValueError, match="client-level DP"):
        AdapterFedAvg(spec, line_search=(0.5, 1.0), weighting="uniform", denominator=4)
    with pytest.raises(ValueError, match="finite multiples"):
        AdapterFedAvg(spec, line_search=(float("inf"),))


def test_the_server_learning_rate_scales_the_step_and_the_line_search_scales_that() -> None:
    """train.server_learning_rate = s: θ + s·u; with a line search the judges score
    multiples of s·u (here η = 3 of a step of 2 × 0.2)."""
    from protocols import keys
    from protocols.packing import unpack_record

    spec = AdapterSpec.from_arrays(_global(), {}, frozen=frozenset({A}))
    scaled = AdapterFedAvg(spec, server_learning_rate=2.0)
    scaled.begin_round(1, to_record(_global()), ConfigRecord())
    arrays, _ = scaled.aggregate_train(1, [_reply(1, {B: np.full((3, 2), 0.2, np.float32)}, 1)])
    assert arrays is not None
    np.testing.assert_allclose(from_record(arrays)[B], 0.4, rtol=1e-6)
    assert from_record(arrays)[A].tobytes() == _global()[A].tobytes()
    with pytest.raises(ValueError, match="server_learning_rate must be > 0"):
        AdapterFedAvg(spec, server_learning_rate=0.0)
    with pytest.raises(ValueError, match="client-level DP"):
        AdapterFedAvg(spec, server_learning_rate=2.0, weighting="uniform", denominator=4)

    strategy, grid, out, stats = _judged_round({11: [4.0, 3.0, 2.0, 1.0]})
    strategy.server_learning_rate = 2.0  # the next round: judged multiples of 2u
    assert stats.line_search_multiple == 3.0
    np.testing.assert_allclose(out[B], 0.6, rtol=1e-6)  # 3 × 0.2
    messages = list(strategy.configure_train(2, to_record(out), ConfigRecord({keys.SEQ_LEN: 16}),
                                             grid))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [Message(RecordDict({"arrays": to_record({B: np.full((3, 2), 0.1, np.float32)}),
                                   "metrics": MetricRecord({"num-examples": 1,
                                                            keys.EDGE_CLIENT: 1.0})}),
                       reply_to=by_node[11])]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    sent = [m for m in grid.sent if m.metadata.message_type == keys.LINE_SEARCH_MESSAGE][-1]
    np.testing.assert_allclose(
        from_record(unpack_record(sent.content.array_records[keys.STEP]))[B], 0.2, rtol=1e-6)
    np.testing.assert_allclose(from_record(arrays)[B], 0.6 + 3 * 0.2, rtol=1e-6)


def _kind_app(edge: set[int], bad: dict[int, MetricRecord] | None = None) -> Any:
    """A ClientApp that answers query.kind from ``edge`` (``bad``: a node's reply as it is)
    and scores every line search lowest at its last candidate."""
    from flwr.clientapp import ClientApp

    from protocols import keys

    app = ClientApp()

    @app.query("kind")
    def kind(msg: Message, context: Any) -> Message:
        record = (bad or {}).get(context.node_id) or MetricRecord(
            {keys.EDGE_CLIENT: 1.0 if context.node_id in edge else 0.0})
        return Message(RecordDict({keys.METRICS: record}), reply_to=msg)

    @app.query("line_search")
    def judge(msg: Message, context: Any) -> Message:
        cfg = msg.content.config_records[keys.CONFIG]
        count = len(cfg[keys.LINE_SEARCH]) * len(cfg.get(keys.LINE_SEARCH_MOMENTUM, [0]))
        losses = [float(count - i) for i in range(count)]
        return Message(RecordDict({keys.METRICS: MetricRecord({keys.LINE_SEARCH_LOSSES: losses})}),
                       reply_to=msg)

    return app


def test_with_edge_role_judge_torch_devices_train_and_edge_devices_judge() -> None:
    """edge.role = 'judge': a round's training sample holds torch devices only, found by
    asking kinds in the round's order (once per device and run); edge devices outside it
    score the line search of the torch devices' step."""
    import random

    from protocols import keys
    from simulations.loopback_grid import LoopbackGrid

    edge = {11, 13, 15}
    grid = LoopbackGrid(_kind_app(edge), range(11, 17), errors_as_replies=True)
    spec = AdapterSpec.from_arrays(_global(), {}, frozen=frozenset({A}))
    strategy = AdapterFedAvg(spec, line_search=(0.5, 1.0, 2.0), edge_role="judge", judges=2,
                             min_train_nodes=2, min_available_nodes=2)
    strategy.node_sampler = random.Random(3)
    config = ConfigRecord({keys.SEQ_LEN: 16})
    messages = list(strategy.configure_train(1, to_record(_global()), config, grid))  # type: ignore[arg-type]
    trainers = [m.metadata.dst_node_id for m in messages]
    assert len(trainers) == 2 and not set(trainers) & edge
    assert all(m.metadata.message_type == "train" for m in messages)
    assert messages[0].content.config_records[keys.CONFIG][keys.SERVER_ROUND] == 1
    asked = [m.metadata.dst_node_id for m in grid.sent
             if m.metadata.message_type == keys.KIND_MESSAGE]
    stats = strategy.stats[1]
    assert stats.kinds_asked == len(asked) >= 4 and stats.judges_drawn == 2
    judges = strategy._round_judges
    assert len(judges) == 2 and set(judges) <= edge
    replies = [Message(RecordDict({"arrays": to_record({B: np.full((3, 2), 0.1, np.float32)}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=m)
               for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(from_record(arrays)[B], 0.2, rtol=1e-6)  # 2 x the mean step
    scored = [m.metadata.dst_node_id for m in grid.sent
              if m.metadata.message_type == keys.LINE_SEARCH_MESSAGE]
    assert sorted(scored) == sorted(judges)
    assert (stats.line_search_multiple, stats.line_search_judges) == (2.0, 2)
    # each judge was sent the round's adapter and the step, and answered three losses
    assert stats.judge_bytes_down > 2 * 2 * B_BYTES
    assert stats.judge_bytes_up == 2 * 3 * 8  # three losses each, 8 bytes a number
    # the next rounds ask no kind already known
    sent_before = len(grid.sent)
    for server_round in (2, 3):
        strategy.node_sampler.seed(server_round)
        again = list(strategy.configure_train(server_round, arrays, config, grid))  # type: ignore[arg-type]
        assert not {m.metadata.dst_node_id for m in again} & edge
    repeated = [m.metadata.dst_node_id for m in grid.sent[sent_before:]
                if m.metadata.message_type == keys.KIND_MESSAGE]
    assert not set(repeated) & set(asked)


def test_a_malformed_kind_reply_leaves_the_device_out_of_the_round(
    caplog: pytest.LogCaptureFixture
) -> None:
    import random

    from protocols import keys
    from simulations.loopback_grid import LoopbackGrid

    bad = {12: MetricRecord({keys.EDGE_CLIENT: 0.5}),
           14: MetricRecord({keys.EDGE_CLIENT: 0.0, "train-loss": 1.0})}
    grid = LoopbackGrid(_kind_app({11}, bad), range(11, 15), errors_as_replies=True)
    spec = AdapterSpec.from_arrays(_global(), {})
    strategy = AdapterFedAvg(spec, line_search=(1.0, 2.0), edge_role="judge", judges=1,
                             min_train_nodes=2, min_available_nodes=2)
    strategy.node_sampler = random.Random(0)
    with caplog.at_level(logging.WARNING):
        messages = list(strategy.configure_train(1, to_record(_global()), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in messages] == [13]  # the one torch device left
    assert strategy._round_judges == [11]
    assert "node 12's kind reply ignored" in caplog.text
    assert "node 14's kind reply ignored: unexpected metric keys" in caplog.text
    assert "1 of 2 devices to train found" in caplog.text


def test_judges_and_the_judge_role_are_checked() -> None:
    spec = AdapterSpec.from_arrays(_global(), {})
    with pytest.raises(ValueError, match="edge_role must be"):
        AdapterFedAvg(spec, edge_role="watch")
    with pytest.raises(ValueError, match="score a line search"):
        AdapterFedAvg(spec, judges=2)
    with pytest.raises(ValueError, match="client-level"):
        AdapterFedAvg(spec, edge_role="judge", weighting="uniform", denominator=4)


def test_line_search_momentum_adds_the_multiple_of_the_last_step_the_judges_choose() -> None:
    """edge.line_search_momentum: round 1 has no last step (η only); from round 2 the judges
    also get the step round 1 applied and score every (η, μ); the coordinator applies
    θ + η·u + μ·m of the lowest pair (here the judge prefers the last candidate)."""
    from protocols import keys
    from protocols.packing import unpack_record
    from simulations.loopback_grid import LoopbackGrid

    grid = LoopbackGrid(_kind_app({11}), [11, 12], errors_as_replies=True)
    spec = AdapterSpec.from_arrays(_global(), {}, frozen=frozenset({A}))
    strategy = AdapterFedAvg(spec, line_search=(1.0, 2.0), line_search_momentum=(0.0, 1.0))
    config = ConfigRecord({keys.SEQ_LEN: 16})
    arrays = to_record(_global())
    expected = _global()[B]
    steps = []
    for server_round, value in ((1, 0.1), (2, -0.05)):
        messages = list(strategy.configure_train(server_round, arrays, config, grid))  # type: ignore[arg-type]
        replies = [Message(RecordDict({"arrays": to_record({B: np.full((3, 2), value, np.float32)}),
                                       "metrics": MetricRecord({"num-examples": 1, **(
                                           {keys.EDGE_CLIENT: 1.0}
                                           if m.metadata.dst_node_id == 11 else {})})}),
                           reply_to=m) for m in messages]
        out, _ = strategy.aggregate_train(server_round, replies)
        assert out is not None
        arrays = out
        steps.append(strategy.stats[server_round])
        asked = [m for m in grid.sent if m.metadata.message_type == keys.LINE_SEARCH_MESSAGE]
        content = asked[-1].content
        if server_round == 1:
            assert keys.LAST_STEP not in content.array_records
            assert keys.LINE_SEARCH_MOMENTUM not in content.config_records[keys.CONFIG]
            expected = expected + np.float32(2) * np.full((3, 2), value, np.float32)
            last = expected - _global()[B]
        else:
            assert content.config_records[keys.CONFIG][keys.LINE_SEARCH_MOMENTUM] == [0.0, 1.0]
            np.testing.assert_allclose(
                from_record(unpack_record(content.array_records[keys.LAST_STEP]))[B], last,
                rtol=1e-6)
            expected = expected + np.float32(2) * np.full((3, 2), value, np.float32) + last
        np.testing.assert_allclose(from_record(arrays)[B], expected, rtol=1e-5, atol=1e-7)
    assert [(s.line_search_multiple, s.line_search_momentum) for s in steps] == \
        [(2.0, None), (2.0, 1.0)]
    with pytest.raises(ValueError, match="with a line search, which is off"):
        AdapterFedAvg(spec, line_search_momentum=(0.0, 0.5))
