"""The ClientApp's line-search handler refuses what it cannot score, before loading a model
or reading data (the scoring itself: tests/client/test_edge_trainer.py; on the real engine:
tests/simulations/test_mixed_federation.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import handle_line_search
from protocols import keys
from protocols.codecs import to_record
from protocols.packing import pack_record
from protocols.run_config import RunConfig


@pytest.fixture(autouse=True)
def server_identity() -> None:
    """Messages are stamped with the sending task's identity (see test_strategy.py)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


def _query(*, multiples: object = (0.0, 1.0), step: bool = True) -> Message:
    adapter = pack_record(to_record({"b": np.zeros((2, 2), np.float32)}))
    content = RecordDict({keys.ARRAYS: adapter, keys.CONFIG: ConfigRecord(
        {keys.LINE_SEARCH: list(multiples) if isinstance(multiples, tuple) else multiples,
         keys.LINE_SEARCH_BLOCKS: 2, keys.SEQ_LEN: 16, keys.SERVER_ROUND: 1})})
    if step:
        content[keys.STEP] = adapter
    return Message(content, dst_node_id=7, message_type=keys.LINE_SEARCH_MESSAGE)


# partitions 0 and 3 are edge devices at edge.fraction 0.5, data.seed 0 (EdgeSection.is_edge)
FLAT = RunConfig.from_nested({"edge": {"fraction": 0.5}}).to_flat()


def test_a_torch_device_refuses_to_score_a_line_search() -> None:
    with pytest.raises(ValueError, match="asked a torch device to score a line search"):
        handle_line_search(_query(), _context(1), FLAT)


def test_a_query_without_the_step_or_with_bad_multiples_is_refused() -> None:
    with pytest.raises(ValueError, match="no `step` record"):
        handle_line_search(_query(step=False), _context(0), FLAT)
    with pytest.raises(ValueError, match="must be a list of numbers"):
        handle_line_search(_query(multiples="0,1"), _context(0), FLAT)
    with pytest.raises(ValueError, match="must be a list of numbers"):
        handle_line_search(_query(multiples=[]), _context(0), FLAT)


def test_a_device_tells_its_kind_and_nothing_else() -> None:
    """query.kind (edge.role = 'judge', edge.judges): 1 from an edge device, 0 from a torch
    device, as the one metric of the reply; the coordinator's check accepts exactly that."""
    from client.app import handle_kind
    from protocols.validation import validate_kind_reply

    query = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1})}),
                    dst_node_id=7, message_type=keys.KIND_MESSAGE)
    answers = {p: handle_kind(query, _context(p), FLAT).content for p in (0, 1, 2, 3)}
    assert {p: dict(c.metric_records[keys.METRICS]) for p, c in answers.items()} == {
        0: {keys.EDGE_CLIENT: 1.0}, 1: {keys.EDGE_CLIENT: 0.0},
        2: {keys.EDGE_CLIENT: 0.0}, 3: {keys.EDGE_CLIENT: 1.0}}
    assert all(set(c.keys()) == {keys.METRICS} for c in answers.values())
    assert [validate_kind_reply(c.metric_records[keys.METRICS]) for c in answers.values()] == \
        [True, False, False, True]


def test_a_momentum_query_without_the_last_step_is_refused() -> None:
    query = _query()
    query.content.config_records[keys.CONFIG][keys.LINE_SEARCH_MOMENTUM] = [0.0, 0.5]
    with pytest.raises(ValueError, match="no `last-step` record"):
        handle_line_search(query, _context(0), FLAT)
