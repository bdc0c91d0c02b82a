"""Secure aggregation through the real ClientApp and strategy, delivered in-process.

The ClientApp is fedtune's own (``make_client_app``, tiny Llama, real training); the
coordinator is :class:`SecAggFedAvg`; a :class:`LoopbackGrid` delivers each message through
Flower's protobuf serialisation. Training is deterministic per (round, node), so the same
nodes under a plain uniform FedAvg give the reference mean the secure sum must match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from protocols.adapter_spec import AdapterSpec
from protocols.codecs import from_record, to_record
from protocols.secagg import error_bound, wire
from server.secagg import ROUND_ID_STRIDE, SecAggFedAvg
from server.strategy import AdapterFedAvg
from simulations.loopback_grid import LoopbackGrid
from tests.measured import within
from tests.server.tiny_federation import tiny_federation

NODES = [11, 22, 33, 44, 2**64 - 5]  # the last needs all 64 bits: packing must not truncate
#: SecAgg+ (Bell et al. 2020): 7 nodes on a 4-regular graph, t = 4 of each neighbourhood of 5.
NODES_PLUS = [*NODES, 55, 66]
#: (nodes, security.secagg_neighbours): the complete graph (SecAgg) and a sparse one (SecAgg+)
GRAPHS = [pytest.param((NODES, 0), id="secagg"), pytest.param((NODES_PLUS, 4), id="secagg+")]


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_federation(tiny_model_dir, tmp_path_factory.mktemp("cache"),
                           learning_rate=0.01)


def _grid(flat: dict[str, Any], nodes: list[int] = NODES) -> LoopbackGrid:
    from client.app import make_client_app

    return LoopbackGrid(make_client_app(flat), nodes,
                        node_config={n: {"partition-id": i % 4} for i, n in enumerate(nodes)})


def _round(strategy: AdapterFedAvg, grid: LoopbackGrid, adapter: dict[str, np.ndarray],
           server_round: int = 1) -> dict[str, np.ndarray] | None:
    config = ConfigRecord({"local-steps": 2, "batch-size": 2, "learning-rate": 0.01,
                           "seq-len": 16, "seed": 0})
    messages = strategy.configure_train(server_round, to_record(adapter), config,
                                        grid)  # type: ignore[arg-type]
    replies = grid.send_and_receive(messages)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else from_record(arrays)


def _strategies(spec: AdapterSpec, **secagg: Any) -> tuple[SecAggFedAvg, AdapterFedAvg]:
    sampling = {"fraction_train": 1.0, "min_train_nodes": 2, "min_available_nodes": 2}
    return (SecAggFedAvg(spec, **secagg, **sampling),
            AdapterFedAvg(spec, weighting="uniform", **sampling))


def _assert_same_mean(secure: dict[str, np.ndarray], plain: dict[str, np.ndarray],
                      spec: AdapterSpec, scale: float, n: int) -> None:
    # the decoded sum is within n*0.5/scale of the plain sum, so the mean within 0.5/scale
    tol = error_bound(num_clients=n, scale=scale) / n + 1e-6
    for key in spec.tensors:
        np.testing.assert_allclose(secure[key], plain[key], atol=tol, rtol=0, err_msg=key)


@pytest.mark.parametrize("graph", GRAPHS)
def test_secure_mean_equals_plain_mean(setup: dict[str, Any],
                                       graph: tuple[list[int], int]) -> None:
    nodes, degree = graph
    n = len(nodes)
    secure, plain = _strategies(setup["spec"], neighbours=degree)
    grid = _grid(setup["flat"], nodes)
    got = _round(secure, grid, setup["adapter"])
    want = _round(plain, _grid(setup["flat"], nodes), setup["adapter"])
    assert got is not None and want is not None
    scale = wire.fixed_point_scale(num_clients=n, clip_range=0.5, modulus_bits=32)
    _assert_same_mean(got, want, setup["spec"], scale, n)
    assert any(not np.array_equal(got[k], setup["adapter"][k]) for k in got), "it trained"
    # FFA-LoRA is the default: A comes back exactly as sent
    for key in setup["spec"].tensors:
        if not setup["spec"].tensors[key].trainable:
            np.testing.assert_array_equal(got[key], setup["adapter"][key])

    # the coordinator never received an update in clear: train replies are uint32 masks
    train_replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(train_replies) == n
    for reply in train_replies:
        assert set(reply.content.array_records) == {wire.MASKED}
        vec = reply.content.array_records[wire.MASKED][wire.MASKED_VECTOR].numpy()
        assert vec.dtype == np.uint32 and vec.size == secure.vector_length
    stats = secure.stats[1]
    assert (stats.accepted, stats.dropped, stats.rejected) == (n, 0, 0)
    assert stats.bytes_up > 0 and stats.protocol_seconds > 0
    # each client seals its shares to, and masks against, exactly its neighbours: all the
    # others in SecAgg, `degree` of them in SecAgg+ (a symmetric graph)
    peers = degree or n - 1
    sealed = {m.metadata.src_node_id: set(wire.SealedShares.from_record(m.content).ciphertexts)
              for m in grid.received if m.metadata.message_type == wire.SHARE_KEYS}
    assert len(sealed) == n and all(len(to) == peers for to in sealed.values())
    assert all(u in sealed[v] for u, to in sealed.items() for v in to)
    for message in stats.sent:
        inst = wire.MaskingInstruction.from_record(message.content)
        assert set(inst.ciphertexts) == {u for u, to in sealed.items()
                                         if message.metadata.dst_node_id in to}


def _assert_each_node_got_its_neighbourhood(grid: LoopbackGrid, nodes: list[int],
                                            degree: int) -> None:
    """In SecAgg+ each node is sent the ids of all nodes but the adverts and consistency
    signatures of its own neighbourhood only (what it checks); on the complete graph all."""
    from protocols.secagg.graph import neighbourhoods

    setup_request = next(wire.SetupRequest.from_record(m.content) for m in grid.sent
                         if m.metadata.message_type == wire.SETUP)
    graph = neighbourhoods(nodes, degree=degree, round_id=setup_request.round_id,
                           salt=setup_request.salt)
    share_keys = {m.metadata.dst_node_id: wire.ShareKeysRequest.from_record(m.content)
                  for m in grid.sent if m.metadata.message_type == wire.SHARE_KEYS}
    assert set(share_keys) == set(nodes)
    for node, request in share_keys.items():
        assert set(request.nodes) == set(nodes)
        assert set(request.adverts) == graph[node] | {node}
    for message in grid.sent:
        if message.metadata.message_type == wire.UNMASK:
            node = message.metadata.dst_node_id
            signers = set(wire.UnmaskRequest.from_record(message.content).signatures)
            assert signers and signers <= graph[node] | {node}


def _authenticated(setup: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The run config with the simulated organisation's roster and key, and the roster."""
    from simulations.organisation import simulated_organisation

    devices = setup["inputs"].devices
    org = simulated_organisation(devices.root, devices.num_clients, setup["cache"])
    return (setup["flat"] | {"paths.secagg_roster": org.roster_text,
                             "paths.roster_public_key": org.org_public_key}, org.roster_text)


@pytest.mark.parametrize(("drop", "degree"), [(None, 0), (wire.CONSISTENCY, 0), (None, 2)])
def test_an_authenticated_round_gives_the_same_mean(setup: dict[str, Any],
                                                    drop: str | None, degree: int) -> None:
    """Signed roster, signed adverts and the consistency round, through the real ClientApp
    (each simulated device signs with the identity key in its own folder). A survivor that
    does not sign the survivor list (t = 3 of 4 still do) is not asked to unmask, and its
    update is still in the sum. SecAgg+ on a ring of 4 (degree 2, t = 3 of each
    neighbourhood of 3): the same mean, each device counting its neighbours' signatures."""
    from client.app import make_client_app

    flat, roster = _authenticated(setup)
    nodes = NODES[:4]  # one per simulated device: one device, one node
    sampling = {"fraction_train": 1.0, "min_train_nodes": 2, "min_available_nodes": 2}
    secure = SecAggFedAvg(setup["spec"], roster=roster, neighbours=degree, **sampling)
    grid = LoopbackGrid(make_client_app(flat), nodes,
                        node_config={n: {"partition-id": i} for i, n in enumerate(nodes)})
    if drop:
        grid.drop[drop].add(nodes[0])
    got = _round(secure, grid, setup["adapter"])
    plain = AdapterFedAvg(setup["spec"], weighting="uniform", **sampling)
    want = _round(plain, LoopbackGrid(make_client_app(setup["flat"]), nodes, node_config={
        n: {"partition-id": i} for i, n in enumerate(nodes)}), setup["adapter"])
    assert got is not None and want is not None
    scale = wire.fixed_point_scale(num_clients=4, clip_range=0.5, modulus_bits=32)
    _assert_same_mean(got, want, setup["spec"], scale, 4)
    kinds = [m.metadata.message_type for m in grid.received]
    assert kinds.count(wire.CONSISTENCY) == 4 - (drop is not None)
    assert kinds.count(wire.UNMASK) == 4 - (drop is not None)
    setup_replies = [wire.KeyAdvert.from_record(m.content) for m in grid.received
                     if m.metadata.message_type == wire.SETUP]
    assert len(setup_replies) == 4 and all(a.identity_pk and a.signature
                                           for a in setup_replies)
    _assert_each_node_got_its_neighbourhood(grid, nodes, degree)


def test_devices_that_pin_the_organisation_key_refuse_an_unauthenticated_coordinator(
    setup: dict[str, Any]
) -> None:
    """The coordinator leaves the roster out (the honest-but-curious protocol): every device
    that pins the organisation key refuses the setup, and the round is abandoned."""
    from client.app import make_client_app

    flat, _ = _authenticated(setup)
    nodes = NODES[:4]
    secure = SecAggFedAvg(setup["spec"], fraction_train=1.0, min_train_nodes=2,
                          min_available_nodes=2)
    grid = LoopbackGrid(make_client_app(flat), nodes, errors_as_replies=True,
                        node_config={n: {"partition-id": i} for i, n in enumerate(nodes)})
    assert _round(secure, grid, setup["adapter"]) is None
    assert secure.stats[1].failed == 4
    errors = [m.error.reason for m in grid.received if m.has_error()]
    assert len(errors) == 4 and all("no signed roster" in reason for reason in errors)
    assert not any(m.metadata.message_type == wire.SHARE_KEYS for m in grid.received)


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("stage", ["train", wire.UNMASK])
def test_dropouts_after_sharing_keys_still_give_the_survivors_mean(
    setup: dict[str, Any], stage: str, graph: tuple[list[int], int]
) -> None:
    """A client gone after sharing keys (train) or after masking (unmask): n − t = 1 of 5
    (t = 4: more than two thirds, whatever threshold_fraction asks for). In SecAgg+ the
    threshold is t = 4 of each neighbourhood of 5 (7 nodes, degree 4): the dropped node's
    pairwise masks are rebuilt from its neighbours' shares of its mask key only."""
    nodes, degree = graph
    secure, plain = _strategies(setup["spec"], threshold_fraction=0.6, neighbours=degree)
    grid = _grid(setup["flat"], nodes)
    reference = _grid(setup["flat"], nodes)
    gone = set(NODES[:1])
    grid.drop[stage] |= gone
    if stage == "train":
        reference.drop["train"] |= gone
    got = _round(secure, grid, setup["adapter"])
    want = _round(plain, reference, setup["adapter"])
    assert got is not None and want is not None
    n = len(nodes) - 1 if stage == "train" else len(nodes)
    scale = wire.fixed_point_scale(num_clients=len(nodes), clip_range=0.5, modulus_bits=32)
    _assert_same_mean(got, want, setup["spec"], scale, n)
    assert secure.stats[1].dropped == (1 if stage == "train" else 0)


@pytest.mark.parametrize("graph", GRAPHS)
def test_too_many_dropouts_abandon_the_round_and_keep_the_adapter(
    setup: dict[str, Any], caplog: pytest.LogCaptureFixture, graph: tuple[list[int], int]
) -> None:
    """t = 4 of 5; in SecAgg+ of each neighbourhood of 5, and on a 4-regular ring of 7 any
    two nodes share a neighbourhood: two dropouts leave it 3 holders."""
    nodes, degree = graph
    secure, _ = _strategies(setup["spec"], threshold_fraction=0.8, neighbours=degree)
    grid = _grid(setup["flat"], nodes)
    grid.drop["train"] |= set(NODES[:2])
    assert _round(secure, grid, setup["adapter"]) is None
    assert "below the SecAgg threshold 4" in caplog.text
    if degree:
        assert "SecAgg+ neighbourhood" in caplog.text


@pytest.mark.measured
@pytest.mark.parametrize("graph", GRAPHS)
def test_distributed_dp_noise_reaches_the_sum(setup: dict[str, Any],
                                              graph: tuple[list[int], int]) -> None:
    """Each client adds N(0, (σC)²/t): the mean's deviation from the plain mean of the
    clipped updates has std ≈ σC·sqrt(n/t)/n (here n = t = 5, or 7 in SecAgg+: t is the
    complete graph's threshold, not the neighbourhood's 5 of 5, which would add sqrt(7/5)
    times the noise)."""
    nodes, degree = graph
    sigma, clip = 0.5, 1e-3
    secure, _ = _strategies(setup["spec"], threshold_fraction=1.0, dp_clip_norm=clip,
                            dp_noise_multiplier=sigma, neighbours=degree)
    got = _round(secure, _grid(setup["flat"], nodes), setup["adapter"])
    assert got is not None
    inst = next(iter(secure.stats[1].sent)).content.config_records[wire.RECORD]
    assert inst["dp-noise-std"] == pytest.approx(sigma * clip / len(nodes) ** 0.5)
    deltas = np.concatenate([(got[k] - setup["adapter"][k]).ravel()
                             for k in setup["spec"].trainable_keys])
    # clipped updates contribute at most clip/n in norm; the noise dominates by far
    expected_std = sigma * clip / len(nodes)
    # The noise is the clients' own (OS randomness, unseeded: a client's DP noise must not be
    # reproducible by anyone), so no seed fixes this number. With ~1,400 coordinates the
    # sample std has a relative standard error of 1.9 %: 15 % is ~8 standard errors (a false
    # alarm < 1e-14), and a wrong scale is off by >= 2x.
    within("|noise std / expected - 1|", abs(deltas.std() / expected_std - 1), below=0.15)


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def test_clients_refuse_out_of_order_and_inconsistent_instructions(
    setup: dict[str, Any]
) -> None:
    from client.secagg_client import handle_setup, handle_share_keys, handle_unmask

    ctx = {n: _context(n) for n in (1, 2, 3)}
    setup_req = wire.SetupRequest(5, b"s" * 16, 3, 3).to_record()
    adverts = {n: wire.KeyAdvert.from_record(handle_setup(setup_req, ctx[n])) for n in ctx}

    with pytest.raises(wire.SecAggProtocolError, match="stage out of order"):
        handle_unmask(wire.UnmaskRequest(5, (1, 2), ()).to_record(), ctx[1])
    with pytest.raises(wire.SecAggProtocolError, match="in round 5"):
        handle_share_keys(wire.ShareKeysRequest(6, adverts).to_record(), ctx[1])
    swapped = dict(adverts)
    swapped[1] = wire.KeyAdvert.from_record(handle_setup(setup_req, _context(9)))
    # (the substituted list is refused before anything is kept: node 1 can still share)
    with pytest.raises(wire.SecAggProtocolError, match="own public keys"):
        handle_share_keys(wire.ShareKeysRequest(5, swapped).to_record(), ctx[1])
    with pytest.raises(wire.SecAggProtocolError, match="threshold"):
        wire.SetupRequest.from_record(wire.SetupRequest(5, b"s" * 16, 1, 3).to_record())


def test_a_node_named_survivor_and_dropped_is_refused(setup: dict[str, Any]) -> None:
    """Run a real round up to masking, then send one client a crooked unmask request."""
    from client.secagg_client import handle_unmask

    secure, _ = _strategies(setup["spec"])
    grid = _grid(setup["flat"])
    config = ConfigRecord({"local-steps": 1, "batch-size": 2, "learning-rate": 0.01,
                           "seq-len": 16, "seed": 0})
    messages = secure.configure_train(1, to_record(setup["adapter"]), config,
                                      grid)  # type: ignore[arg-type]
    grid.send_and_receive(messages)
    ctx = grid.contexts[NODES[0]]
    crooked = {
        "named both survivor and dropped": (tuple(NODES), (NODES[1],)),
        "not among my peers": ((*tuple(NODES[:4]), 99), ()),
        "not named a survivor": (tuple(NODES[1:]), (NODES[0],)),
        "fewer than the threshold": ((NODES[0],), tuple(NODES[1:])),
    }
    for reason, (survivors, dropped) in crooked.items():
        with pytest.raises(wire.SecAggProtocolError, match=reason):
            handle_unmask(wire.UnmaskRequest(ROUND_ID_STRIDE, survivors, dropped).to_record(),
                          ctx)
    # a refused request reveals nothing and leaves the node able to answer a sound one
    reply = handle_unmask(wire.UnmaskRequest(ROUND_ID_STRIDE, tuple(NODES), ()).to_record(),
                          ctx)
    assert len(wire.UnmaskShares.from_record(reply).b_shares) == 5


def test_malformed_masked_input_is_rejected_as_a_dropout(setup: dict[str, Any]) -> None:
    secure, plain = _strategies(setup["spec"])
    grid = _grid(setup["flat"])
    config = ConfigRecord({"local-steps": 2, "batch-size": 2, "learning-rate": 0.01,
                           "seq-len": 16, "seed": 0})
    messages = secure.configure_train(1, to_record(setup["adapter"]), config,
                                      grid)  # type: ignore[arg-type]
    replies = grid.send_and_receive(messages)
    bad = replies[0]
    vec = bad.content.array_records[wire.MASKED][wire.MASKED_VECTOR].numpy()
    bad.content[wire.MASKED] = ArrayRecord({wire.MASKED_VECTOR: _array(vec[:-1])})
    arrays, _ = secure.aggregate_train(1, replies)
    assert arrays is not None
    assert secure.stats[1].rejected == 1 and secure.stats[1].dropped == 1
    assert "masked vector must be" in secure.stats[1].rejections[0]
    reference = _grid(setup["flat"])
    reference.drop["train"].add(bad.metadata.src_node_id)
    want = _round(plain, reference, setup["adapter"])
    assert want is not None
    scale = wire.fixed_point_scale(num_clients=5, clip_range=0.5, modulus_bits=32)
    _assert_same_mean(from_record(arrays), want, setup["spec"], scale, 4)


def _array(values: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(values))


def test_wire_records_round_trip() -> None:
    inst = wire.MaskingInstruction(round_id=3, ciphertexts={2**63 + 1: b"x" * 60},
                                   modulus_bits=32, scale=2.0**20, clip_range=0.5)
    back = wire.MaskingInstruction.from_record(RecordDict({wire.RECORD: inst.to_record()}))
    assert back == inst
    with pytest.raises(wire.SecAggProtocolError, match="8-byte"):
        wire.unpack_ids(b"123", "nodes")
    assert json.dumps(wire.unpack_ids(wire.pack_ids([1, 2**64 - 1]), "x")) == \
        f"[1, {2**64 - 1}]"


# -- a lying coordinator against the real client stages (issue 14) ------------------------


def test_a_threshold_of_two_thirds_or_less_is_refused_before_any_key_is_made() -> None:
    """The coordinator announces t = 2 of 5 (what made split unmask requests work): the
    client refuses the setup and keeps no secret of the round."""
    from client.secagg_client import STATE_KEY, handle_setup

    ctx = _context(1)
    for threshold, nodes in ((2, 5), (2, 3), (6, 9)):
        with pytest.raises(wire.SecAggProtocolError, match="more than two thirds"):
            handle_setup(wire.SetupRequest(7, b"s" * 16, threshold, nodes).to_record(), ctx)
    assert STATE_KEY not in ctx.state.config_records
    handle_setup(wire.SetupRequest(7, b"s" * 16, 4, 5).to_record(), ctx)  # 4 of 5 is fine
    assert STATE_KEY in ctx.state.config_records


def test_a_stale_or_repeated_setup_is_refused_and_the_round_goes_on() -> None:
    """A setup for an earlier (or the same) round, sent mid-round, would overwrite the
    round's secrets: refused, and the round in progress still completes its next stage."""
    from client.secagg_client import handle_setup, handle_share_keys

    ctx = {n: _context(n) for n in (1, 2, 3)}
    fresh = wire.SetupRequest(8, b"s" * 16, 3, 3).to_record()
    adverts = {n: wire.KeyAdvert.from_record(handle_setup(fresh, ctx[n])) for n in ctx}
    for stale in (wire.SetupRequest(7, b"t" * 16, 3, 3), wire.SetupRequest(8, b"t" * 16, 3, 3)):
        with pytest.raises(wire.SecAggProtocolError, match="stale or repeated setup"):
            handle_setup(stale.to_record(), ctx[1])
    sealed = wire.SealedShares.from_record(
        handle_share_keys(wire.ShareKeysRequest(8, adverts).to_record(), ctx[1]))
    assert set(sealed.ciphertexts) == {2, 3}
    handle_setup(wire.SetupRequest(9, b"u" * 16, 3, 3).to_record(), ctx[1])  # the next round


def test_a_key_list_longer_than_announced_is_refused() -> None:
    """Setup announced 3 nodes (t = 3); the key list then carries 4, fake nodes included,
    which would bring the threshold to 3 of 4: refused, no share sealed."""
    from client.secagg_client import handle_setup, handle_share_keys

    ctx = {n: _context(n) for n in (1, 2, 3, 4)}
    req = wire.SetupRequest(5, b"s" * 16, 3, 3).to_record()
    adverts = {n: wire.KeyAdvert.from_record(handle_setup(req, ctx[n])) for n in ctx}
    with pytest.raises(wire.SecAggProtocolError, match="4 nodes in the key list but 3"):
        handle_share_keys(wire.ShareKeysRequest(5, adverts).to_record(), ctx[1])


def test_split_unmask_requests_cannot_unmask_any_node(setup: dict[str, Any]) -> None:
    """A real round of 5 up to masking (t = 4, the bound), then the coordinator splits the
    other four clients into a group told node X survived (they release X's self-mask
    share, as X itself does) and a group told X dropped (they release X's mask-key share).
    Every request is consistent on its own, so every client answers — and for every split
    the coordinator holds fewer than t shares of one of X's two secrets: X's update stays
    masked. (With t = 2 of 5, refused now at setup, the split recovered it exactly.)"""
    from itertools import combinations

    from client.secagg_client import handle_unmask
    from protocols.secagg import reconstruct_secrets

    secure, _ = _strategies(setup["spec"], threshold_fraction=0.5)  # asks 3, gets 4
    grid = _grid(setup["flat"])
    config = ConfigRecord({"local-steps": 1, "batch-size": 2, "learning-rate": 0.01,
                           "seq-len": 16, "seed": 0})
    messages = secure.configure_train(1, to_record(setup["adapter"]), config,
                                      grid)  # type: ignore[arg-type]
    assert secure._secagg is not None and secure._secagg.threshold == 4
    grid.send_and_receive(messages)
    x, others = NODES[0], NODES[1:]
    rid = secure._secagg.round_id
    for size in range(len(others) + 1):
        for told_survived in combinations(others, size):
            b_shares: dict[int, bytes] = {}
            s_shares: dict[int, bytes] = {}
            for node in NODES:
                fresh = _snapshot(grid.contexts[node])
                if node == x or node in told_survived:
                    request = wire.UnmaskRequest(rid, tuple(NODES), ())
                else:
                    request = wire.UnmaskRequest(rid, tuple(n for n in NODES if n != x), (x,))
                shares = wire.UnmaskShares.from_record(handle_unmask(request.to_record(), fresh))
                if x in shares.b_shares:
                    b_shares[node] = shares.b_shares[x]
                if x in shares.s_shares:
                    s_shares[node] = shares.s_shares[x]
            assert len(b_shares) < 4 or len(s_shares) < 4, told_survived
            short = b_shares if len(b_shares) < 4 else s_shares
            with pytest.raises(ValueError):
                reconstruct_secrets({x: short}, threshold=4)


def _snapshot(context: Context) -> Context:
    """A copy of a node's context (its round secrets), so each split starts from the same
    state: a node answers one unmask request per round."""
    state = RecordDict({k: ConfigRecord(dict(v)) for k, v in context.state.config_records.items()})
    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config=dict(context.node_config), state=state, run_config={})


@pytest.mark.parametrize(("codec", "bits"), [("int8", 11), ("int4", 7), ("int3", 5),
                                             ("int2", 4)])
def test_quantized_codes_inside_secure_aggregation_shrink_the_masked_upload(
        setup: dict[str, Any], codec: str, bits: int) -> None:
    """int8 / int4 / int2 under SecAgg: every device rounds its update stochastically onto
    one shared grid of 2L + 1 levels and masks the codes mod 2**m, m = bit_length(5 L) + 1
    (11, 7, 5, 4 bits for five devices): the masked upload is m/32 of the exact one, the mean
    lands within the grid's rounding of the exact secure mean, and each device keeps what
    its quantization lost."""
    from client.error_feedback import RESIDUAL_KEY
    from protocols.secagg.fixed_point import QUANTIZED_LEVELS

    reach = 2 * 0.01  # local steps x learning rate: the auto range of the config
    exact, _ = _strategies(setup["spec"])
    quantized, _ = _strategies(setup["spec"], codec=codec, quant_range=reach)
    want = _round(exact, _grid(setup["flat"]), setup["adapter"])
    grid = _grid(setup["flat"])
    got = _round(quantized, grid, setup["adapter"])
    assert got is not None and want is not None
    stats_q, stats_x = quantized.stats[1], exact.stats[1]
    assert (stats_q.accepted, stats_q.rejected) == (5, 0)
    inst = next(iter(quantized.stats[1].sent)).content.config_records[wire.RECORD]
    assert inst["modulus-bits"] == bits and inst["levels"] == QUANTIZED_LEVELS[codec]
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    for reply in replies:
        vec = reply.content.array_records[wire.MASKED][wire.MASKED_VECTOR].numpy()
        assert vec.dtype == np.uint8 and vec.size == -(-quantized.vector_length * bits // 8)
    # bytes up: the packed codes save (32 - m) bits per coordinate on every reply (the
    # metrics and framing weigh the same in both runs)
    saved = 5 * quantized.vector_length * (32 - bits) // 8
    assert abs((stats_x.bytes_up - stats_q.bytes_up) - saved) <= 5 * 8, (stats_x.bytes_up,
                                                                          stats_q.bytes_up)
    # the error of the mean: each device's code is its value +- one step, independently
    step = reach / QUANTIZED_LEVELS[codec]
    keys = sorted(setup["spec"].trainable_keys)
    err = np.concatenate([(got[k] - want[k]).ravel() for k in keys])
    assert np.abs(err).max() <= step * (1 + 1e-6)  # at most one step, whatever the draws
    assert np.sqrt(np.mean(err**2)) <= step / 2 / np.sqrt(5) * 1.5  # variance <= step^2/4
    for node in NODES:  # the quantization residual stays on each device
        assert RESIDUAL_KEY in grid.contexts[node].state.array_records


@pytest.mark.measured
def test_dp_on_quantized_uploads_adds_skellam_noise_in_a_small_modulus(
        setup: dict[str, Any]) -> None:
    """int4 with client-level DP under SecAgg: the coordinator plans integer noise
    (protocols.secagg.integer_noise), each device rounds within Δ2 and adds its Skellam
    share, the masked codes travel in the plan's modulus (well under 32 bits), and the mean
    carries the noise the plan promises: std √μ / (s · n) per coordinate, μ ≈ (σ Δ2)²."""
    from protocols.secagg.integer_noise import plan_integer_noise

    sigma, clip = 0.5, 1e-3
    secure, _ = _strategies(setup["spec"], codec="int4", quant_range=0.02,
                            threshold_fraction=1.0, dp_clip_norm=clip,
                            dp_noise_multiplier=sigma)
    grid = _grid(setup["flat"])
    got = _round(secure, grid, setup["adapter"])
    assert got is not None and secure.stats[1].accepted == 5
    plan = plan_integer_noise(num_clients=5, threshold=5, dim=secure.vector_length,
                              clip_norm=clip, noise_multiplier=sigma, quant_range=0.02, levels=7)
    inst = next(iter(secure.stats[1].sent)).content.config_records[wire.RECORD]
    assert inst["modulus-bits"] == plan.modulus_bits < 32
    assert inst["skellam-variance"] == plan.per_client_variance and inst["dp-noise-std"] == 0
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    for reply in replies:
        vec = reply.content.array_records[wire.MASKED][wire.MASKED_VECTOR].numpy()
        assert vec.size == -(-secure.vector_length * plan.modulus_bits // 8)
    deltas = np.concatenate([(got[k] - setup["adapter"][k]).ravel()
                             for k in sorted(setup["spec"].trainable_keys)])
    expected_std = plan.noise_std / 5  # the clipped signal (norm <= C / 5) is negligible
    assert sigma * clip / 5 <= expected_std <= 1.1 * sigma * clip / 5
    # ~1,400 coordinates: relative standard error 1.9 %, 15 % is ~8 of them (as above)
    within("|noise std / expected - 1|", abs(deltas.std() / expected_std - 1), below=0.15)


def test_masked_uploads_are_summed_as_they_arrive_so_memory_does_not_grow() -> None:
    """Streaming under secure aggregation (issue 18, point 2): each masked upload is folded
    into one running sum mod 2**m and dropped, so the coordinator's traced peak while
    aggregating 16 uploads of 100,000 values (400 KB each) is that of 4; keeping them would
    hold 6.4 MB more."""
    from simulations.bench.secagg_scaling import one_round
    from simulations.flower_patches import task_identity

    with task_identity():
        few = one_round(4, 100_000, "secagg")["peak_mb"]
        many = one_round(16, 100_000, "secagg")["peak_mb"]
    assert many < few + 1.5, (few, many)  # one upload more is already +0.4 MB


def test_train_instructions_under_secure_aggregation_carry_the_last_step(
        setup: dict[str, Any]) -> None:
    """edge.subspace = 'trajectory' under SecAgg: the masked round's train messages, built
    anew for the surviving senders, still carry the coordinator's last step (edge devices
    train along it and send their masked dense delta)."""
    from protocols import keys
    from protocols.packing import unpack_record

    secure, _ = _strategies(setup["spec"])
    config = ConfigRecord({"local-steps": 2, "batch-size": 2, "learning-rate": 0.01,
                           "seq-len": 16, "seed": 0, keys.EDGE_LEARNING_RATE: 1.0,
                           keys.EDGE_LOCAL_STEPS: 2, keys.EDGE_CODEC: "seed-scalar",
                           keys.EDGE_SUBSPACE: "trajectory"})
    messages = list(secure.configure_train(1, to_record(setup["adapter"]), config,
                                           _grid(setup["flat"])))  # type: ignore[arg-type]
    assert len(messages) == len(NODES)
    for msg in messages:
        step = from_record(unpack_record(msg.content.array_records[keys.LAST_STEP]))
        assert set(step) == set(setup["spec"].trainable_keys)
        assert not any(v.any() for v in step.values())  # round 1: no step yet
