"""Who shares and masks with whom: the complete graph (SecAgg) or a k-regular one (SecAgg+).

Bonawitz et al. (CCS 2017) have every client Shamir-share its secrets with, and mask
pairwise against, every other client: each client computes ``n`` pairwise masks of the
update's length and the coordinator ``O(n²)`` of them when clients drop. Bell et al.
("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) replace the
complete graph by a sparse random one of degree ``k = O(log n)``: a client shares only with,
and masks only against, its ``k`` neighbours, and the Shamir threshold applies within each
neighbourhood.

:func:`neighbourhoods` builds a Harary-style ring: the node ids are put in an order derived
from SHA-256 of public round values (the round id, the round's salt and the node list), and
each node is joined to the ``k/2`` nodes on either side of it in that order. Every client
recomputes the same graph from what the setup and key list told it, so it can check that the
coordinator routes shares and survivor lists along that graph and no other. Bell et al.'s
analysis assumes a *random* graph, unknown in advance to the corrupted parties; here the
permutation is pseudo-random in the salt, and the salt is the coordinator's choice: against
an honest-but-curious coordinator (which follows the protocol and draws the salt fresh from
``os.urandom``) the graph is as random as SHA-256 makes it, but a malicious coordinator can
grind salts until colluding nodes surround a victim. A client-contributed randomness beacon
would remove that; it is not implemented. ``degree = 0``, or a degree that leaves no node
out (``degree >= len(nodes) - 1``), is the complete graph: SecAgg exactly.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

_DOMAIN = b"fedtune/secagg+/graph/v1\0"


def is_complete(num_nodes: int, degree: int) -> bool:
    """Whether ``degree`` over ``num_nodes`` nodes gives the complete graph (SecAgg)."""
    return degree == 0 or degree >= num_nodes - 1


def check_degree(degree: int) -> None:
    """Refuse a degree :func:`neighbourhoods` cannot build: 0 (complete) or even >= 2."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"graph degree must be a non-negative integer, got {degree!r}")
    if degree and (degree < 2 or degree % 2):
        raise ValueError(
            f"graph degree {degree} must be 0 (the complete graph) or even and >= 2: the ring "
            "joins each node to degree/2 nodes on either side")


def neighbourhood_size(num_nodes: int, degree: int) -> int:
    """The nodes that hold one node's shares, itself included: ``degree + 1``, or all."""
    return num_nodes if is_complete(num_nodes, degree) else degree + 1


def neighbourhoods(nodes: Iterable[int], *, degree: int, round_id: int,
                   salt: bytes) -> dict[int, frozenset[int]]:
    """Each node's neighbours (not itself) on the round's graph; symmetric, ``degree``-regular
    (or complete, see the module docstring). Raises ``ValueError`` for an odd degree."""
    check_degree(degree)
    given = [int(n) for n in nodes]
    ids = sorted(set(given))
    if len(ids) != len(given):
        raise ValueError("node ids repeat")
    if is_complete(len(ids), degree):
        everyone = frozenset(ids)
        return {n: everyone - {n} for n in ids}
    prefix = (_DOMAIN + struct.pack(">QQ", round_id, len(salt)) + salt
              + struct.pack(">Q", len(ids)) + b"".join(struct.pack(">Q", n) for n in ids))
    order = sorted(ids, key=lambda n: hashlib.sha256(prefix + struct.pack(">Q", n)).digest())
    half, size = degree // 2, len(ids)
    return {node: frozenset(order[(i + j) % size] for j in range(-half, half + 1) if j)
            for i, node in enumerate(order)}
