"""The simulations' patches of Flower internals (simulations/flower_patches.py): each still
fits the installed Flower, is in force inside its scope, and Flower's original is back after
it (the seeded ids' effect on sampling: tests/simulations/test_split_and_config.py).
"""

from __future__ import annotations

import inspect

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.linkstate import InMemoryLinkState, in_memory_linkstate
from flwr.supercore.task_identity import TaskIdentity

from simulations.flower_patches import (
    NODE_IDS_ATTR,
    TASK_IDENTITY_ATTRS,
    seeded_node_ids,
    task_identity,
)
from simulations.seeded_node_ids import node_id_stream

NODE_IDS = "Flower changed: revisit simulations/flower_patches.py:seeded_node_ids"
IDENTITY = "Flower changed: revisit simulations/flower_patches.py:task_identity"


class Boom(Exception):
    pass


def _new_node_id() -> int:
    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    state = InMemoryLinkState(NoOpFederationManager(), ObjectStoreFactory().store())
    return state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, b"k" * 32,
                             heartbeat_interval=HEARTBEAT_INTERVAL_INF)


def _identity() -> tuple[object, ...]:
    return tuple(getattr(TaskIdentity, attr) for attr in TASK_IDENTITY_ATTRS)


# --- seeded_node_ids ----------------------------------------------------------------------------


def test_guard_the_linkstate_draws_node_ids_through_the_name_we_replace() -> None:
    original = getattr(in_memory_linkstate, NODE_IDS_ATTR, None)
    assert callable(original), NODE_IDS
    params = inspect.signature(original).parameters
    assert list(params) == ["num_bytes", "exclude"], NODE_IDS
    assert params["exclude"].default is None, NODE_IDS
    assert f"{NODE_IDS_ATTR}(" in inspect.getsource(InMemoryLinkState.create_node), NODE_IDS
    # ours has the same signature
    assert list(inspect.signature(node_id_stream(0)).parameters) == list(params)


def test_inside_seeded_node_ids_the_linkstate_draws_from_the_seed() -> None:
    original = getattr(in_memory_linkstate, NODE_IDS_ATTR)
    with seeded_node_ids(5):
        assert getattr(in_memory_linkstate, NODE_IDS_ATTR) is not original
        first = _new_node_id()
    with seeded_node_ids(5):
        again = _new_node_id()
    from flwr.common.constant import NODE_ID_NUM_BYTES, SUPERLINK_NODE_ID

    assert first == again
    assert first == node_id_stream(5)(NODE_ID_NUM_BYTES, {SUPERLINK_NODE_ID, 0})
    assert getattr(in_memory_linkstate, NODE_IDS_ATTR) is original
    assert _new_node_id() != first  # Flower's random ids again (1 in 2^64 of a false failure)


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_seeded_node_ids_restores_flowers_function_when_the_scope_raised(
    error: type[BaseException]
) -> None:
    original = getattr(in_memory_linkstate, NODE_IDS_ATTR)
    with pytest.raises(error), seeded_node_ids(0):
        raise error()
    assert getattr(in_memory_linkstate, NODE_IDS_ATTR) is original


def test_nested_seeded_node_ids_restore_in_order() -> None:
    original = getattr(in_memory_linkstate, NODE_IDS_ATTR)
    with seeded_node_ids(0):
        outer = getattr(in_memory_linkstate, NODE_IDS_ATTR)
        with seeded_node_ids(1):
            assert getattr(in_memory_linkstate, NODE_IDS_ATTR) is not outer
        assert getattr(in_memory_linkstate, NODE_IDS_ATTR) is outer
    assert getattr(in_memory_linkstate, NODE_IDS_ATTR) is original


# --- task_identity ------------------------------------------------------------------------------


def test_guard_task_identity_keeps_its_ids_where_we_set_and_restore_them() -> None:
    meta = type(TaskIdentity)
    for attr in TASK_IDENTITY_ATTRS:
        assert attr in vars(TaskIdentity), IDENTITY
        public = attr.removeprefix("_")
        prop = vars(meta).get(public)
        assert isinstance(prop, property) and prop.fset is not None, IDENTITY
    assert "TaskIdentity.run_id" in inspect.getsource(Message.__init__), IDENTITY


def test_inside_task_identity_messages_carry_it_and_after_it_the_old_one_is_back(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    for attr in TASK_IDENTITY_ATTRS:  # a process no Flower entry point set up
        monkeypatch.setattr(TaskIdentity, attr, None)
    with task_identity(run_id=7, task_id=8, node_id=9):
        msg = Message(RecordDict(), dst_node_id=5, message_type="train")
        assert (msg.metadata.run_id, msg.metadata.src_task_id, msg.metadata.src_node_id) == (
            7, 8, 9)
    assert _identity() == (None, None, None)
    with pytest.raises(RuntimeError, match="not set"):
        Message(RecordDict(), dst_node_id=5, message_type="train")


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_task_identity_restores_the_old_ids_when_the_scope_raised(
    monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    before = (object(), object(), object())  # identity, not equality, is checked
    for attr, value in zip(TASK_IDENTITY_ATTRS, before, strict=True):
        monkeypatch.setattr(TaskIdentity, attr, value)
    with pytest.raises(error), task_identity():
        assert _identity() == (1, 1, 0)
        raise error()
    assert all(a is b for a, b in zip(_identity(), before, strict=True))
