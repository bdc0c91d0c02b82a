"""The SecAgg+ graph (:mod:`protocols.secagg.graph`): every party recomputes the same
k-regular, symmetric graph from public round values; degree 0 (or one that leaves no node
out) is SecAgg's complete graph."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.secagg.graph import is_complete, neighbourhood_size, neighbourhoods

SALT = b"s" * 16


@settings(max_examples=60, deadline=None)
@given(nodes=st.sets(st.integers(0, 2**64 - 1), min_size=4, max_size=40),
       half=st.integers(1, 8), round_id=st.integers(0, 2**63 - 1),
       salt=st.binary(min_size=16, max_size=16))
def test_a_ring_is_k_regular_symmetric_and_the_same_for_everyone(
        nodes: set[int], half: int, round_id: int, salt: bytes) -> None:
    degree = 2 * half
    graph = neighbourhoods(nodes, degree=degree, round_id=round_id, salt=salt)
    assert set(graph) == nodes
    shuffled = sorted(nodes, reverse=True)  # the order nodes are listed in does not matter
    assert neighbourhoods(shuffled, degree=degree, round_id=round_id, salt=salt) == graph
    for node, peers in graph.items():
        assert node not in peers and peers <= nodes
        assert len(peers) == (len(nodes) - 1 if is_complete(len(nodes), degree) else degree)
        assert all(node in graph[peer] for peer in peers)
        assert len(peers) + 1 == neighbourhood_size(len(nodes), degree)


def test_degree_zero_or_no_node_left_out_is_the_complete_graph() -> None:
    nodes = [5, 1, 9, 7]
    complete = {n: frozenset(set(nodes) - {n}) for n in nodes}
    for degree in (0, 4, 6):
        assert neighbourhoods(nodes, degree=degree, round_id=1, salt=SALT) == complete
    assert neighbourhoods(nodes, degree=2, round_id=1, salt=SALT) != complete


def test_the_round_values_pick_the_graph() -> None:
    nodes = range(1, 31)
    base = neighbourhoods(nodes, degree=4, round_id=1, salt=SALT)
    assert neighbourhoods(nodes, degree=4, round_id=1, salt=b"t" * 16) != base
    assert neighbourhoods(nodes, degree=4, round_id=2, salt=SALT) != base
    assert neighbourhoods(nodes, degree=4, round_id=1, salt=SALT) == base
    # a ring in a pseudo-random order, not in the order of the ids
    assert any(not {n - 1, n + 1} <= base[n] for n in range(2, 30))


@pytest.mark.parametrize("degree", [1, 3, 5, -2])
def test_odd_or_negative_degrees_are_refused(degree: int) -> None:
    with pytest.raises(ValueError, match="degree"):
        neighbourhoods(range(10), degree=degree, round_id=1, salt=SALT)


def test_repeated_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="repeat"):
        neighbourhoods([1, 2, 2, 3, 4], degree=2, round_id=1, salt=SALT)
