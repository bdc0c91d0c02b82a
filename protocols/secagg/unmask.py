"""The unmasking round: the coordinator's arithmetic and the check each client makes first.

After the masked-input round the coordinator knows two disjoint sets (Bonawitz et al.,
CCS 2017, §4, round 4): *survivors*, whose masked inputs it received, and *dropped* clients,
which shared keys but sent no input. It asks every responding client for its shares of ``b_u``
for each survivor and of ``s_u`` (mask private key) for each dropped client, then

1. :func:`reconstruct_secrets` — Shamir-combine each node's secret from ≥ t shares;
2. :func:`dropped_pair_seeds` — recompute, from each dropped node's private key, the pairwise
   seeds it shared with surviving neighbours (their masks no longer cancel);
3. :func:`remove_masks` — subtract the survivors' self masks and those pairwise masks from
   :func:`sum_masked` of the survivors' uploads; then ``fixed_point.decode_sum``.

A client must never reveal both shares of one peer: with ``b_u`` and ``s_u`` the coordinator
could unmask ``u``'s individual input. :func:`check_unmask_request` is the client's refusal.
It sees only the request addressed to it; a coordinator that tells different clients
different stories is caught by Bonawitz's signed consistency round (active adversary
model), which authenticated rounds run first (:mod:`protocols.secagg.identity`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.secagg.fixed_point import UIntArray, reduce_mod, uint_dtype
from protocols.secagg.keys import load_private_key, pair_key, public_bytes
from protocols.secagg.masks import pairwise_mask, self_mask
from protocols.secagg.shamir import combine


class InconsistentRequest(ValueError):
    """An unmask request an honest client must refuse; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def min_threshold(num_nodes: int) -> int:
    """The smallest Shamir threshold a client accepts for ``num_nodes`` nodes: more than two
    thirds, and at least 2 (Bonawitz et al. 2017, §6: the bound of the active-adversary
    model). A coordinator that sends different survivor lists to different clients ("split
    unmask requests") needs ``t`` holders to release a node's self-mask shares and another
    ``t`` to release its mask-key shares, and no holder answers both for one node; with
    ``t > 2n/3`` two such groups cannot exist among the ``n`` nodes, even with up to a third
    of them colluding with the coordinator."""
    return max(2, (2 * num_nodes) // 3 + 1)


def check_unmask_request(
    *,
    survivors: AbstractSet[int],
    dropped: AbstractSet[int],
    my_peers: AbstractSet[int],
    threshold: int,
) -> None:
    """Refuse a request that could unmask one client or reach outside this client's peers.

    ``my_peers`` are the nodes whose shares this client holds (everyone in SecAgg, the
    neighbourhood in SecAgg+; the client itself included, as it keeps a share of its own
    secrets). Raises :class:`InconsistentRequest` if a node is named both survivor and
    dropped, if a named node is not in ``my_peers``, or if fewer than ``threshold`` survivors
    remain (the unmasked sum would cover too few clients to hide any one of them).
    """
    both = survivors & dropped
    if both:
        raise InconsistentRequest(
            f"nodes {sorted(both)} are named both survivor and dropped; revealing both their "
            f"self-mask and mask-key shares would expose their inputs"
        )
    strangers = (survivors | dropped) - my_peers
    if strangers:
        raise InconsistentRequest(f"nodes {sorted(strangers)} are not among my peers")
    if len(survivors) < threshold:
        raise InconsistentRequest(
            f"only {len(survivors)} survivors, fewer than the threshold {threshold}"
        )


class MaskedSum:
    """The survivors' masked uploads summed mod ``2**modulus_bits`` as they arrive: one
    vector of state whatever the number of clients (an upload is not needed once folded in:
    unmasking works on the sum). Checks dtype and length per node."""

    def __init__(self, *, modulus_bits: int, length: int | None = None) -> None:
        self.modulus_bits = modulus_bits
        self.dtype = uint_dtype(modulus_bits)
        self.length = length
        self.nodes: list[int] = []
        self._total: UIntArray | None = None

    def add(self, node: int, masked: npt.NDArray[Any]) -> None:
        arr = np.asarray(masked)
        if arr.dtype != self.dtype:
            raise TypeError(f"node {node}: expected dtype {self.dtype}, got {arr.dtype}")
        shape = (self.length,) if self.length is not None else (
            self._total.shape if self._total is not None else arr.shape)
        if arr.shape != shape:
            raise ValueError(f"node {node}: expected shape {shape}, got {arr.shape}")
        if node in self.nodes:
            raise ValueError(f"node {node}: a second masked input")
        if self._total is None:
            self._total = arr.copy()
        else:
            self._total += arr
            reduce_mod(self._total, self.modulus_bits)
        self.nodes.append(node)

    @property
    def total(self) -> UIntArray:
        if self._total is None:
            raise ValueError("no masked inputs to sum")
        return reduce_mod(self._total, self.modulus_bits)


def sum_masked(masked_inputs: Mapping[int, npt.NDArray[Any]], *, modulus_bits: int) -> UIntArray:
    """Sum the survivors' uploads mod ``2**modulus_bits``; checks dtype and shape per node."""
    folded = MaskedSum(modulus_bits=modulus_bits)
    for node, value in masked_inputs.items():
        folded.add(node, value)
    return folded.total


def reconstruct_secrets(
    shares: Mapping[int, Mapping[int, bytes]], *, threshold: int
) -> dict[int, bytes]:
    """Combine ``shares[owner][holder]`` into each owner's 32-byte secret.

    Raises ``ValueError`` naming the first owner with too few or inconsistent shares: with
    more than ``n − t`` clients gone, the round cannot be unmasked and must be abandoned.
    """
    out: dict[int, bytes] = {}
    for owner, held in shares.items():
        try:
            out[owner] = combine(held, threshold=threshold)
        except ValueError as exc:
            raise ValueError(f"node {owner}: {exc}") from None
    return out


def dropped_pair_seeds(
    *,
    dropped_mask_keys: Mapping[int, bytes],
    mask_public_keys: Mapping[int, bytes],
    neighbours: Mapping[int, Collection[int]],
    survivors: Collection[int],
    round_id: int,
    salt: bytes,
) -> dict[tuple[int, int], bytes]:
    """Pairwise seeds ``(survivor, dropped) -> s_ud`` that no longer cancel in the sum.

    ``dropped_mask_keys`` holds each dropped node's reconstructed raw mask private key;
    ``mask_public_keys`` every node's advertised mask public key; ``neighbours[d]`` the peers
    ``d`` masked with. Each reconstructed key is checked against the advertised public key,
    so a wrong reconstruction fails here with the node id rather than as noise in the sum.
    """
    alive = set(survivors)
    seeds: dict[tuple[int, int], bytes] = {}
    for d, raw in dropped_mask_keys.items():
        if d in alive:
            raise ValueError(f"node {d} is listed as both dropped and survivor")
        private = load_private_key(raw)
        if public_bytes(private.public_key()) != _public_key(mask_public_keys, d):
            raise ValueError(
                f"node {d}: the reconstructed mask key does not match its advertised public key"
            )
        for u in neighbours[d]:
            if u in alive:
                seeds[(u, d)] = pair_key(private, _public_key(mask_public_keys, u),
                                         purpose="mask", round_id=round_id, own_id=d,
                                         peer_id=u, salt=salt)
    return seeds


def remove_masks(
    masked_sum: npt.NDArray[Any],
    *,
    self_seeds: Mapping[int, bytes],
    dropped_pair_seeds: Mapping[tuple[int, int], bytes],
    modulus_bits: int,
) -> UIntArray:
    """Subtract every survivor's self mask and the uncancelled pairwise masks.

    ``self_seeds`` maps each survivor to its reconstructed ``b_u`` (exactly the nodes summed
    in ``masked_sum``); ``dropped_pair_seeds`` maps ``(survivor, dropped)`` to their seed, as
    from :func:`dropped_pair_seeds`. The result is the sum of the survivors' fixed-point inputs
    mod ``2**k``, ready for ``fixed_point.decode_sum(num_clients=len(self_seeds))``.
    """
    dtype = uint_dtype(modulus_bits)
    arr = np.asarray(masked_sum)
    if arr.dtype != dtype:
        raise TypeError(f"masked_sum: expected dtype {dtype}, got {arr.dtype}")
    out = arr.copy()
    for seed in self_seeds.values():
        out -= self_mask(seed, arr.shape, modulus_bits=modulus_bits)
    for (u, d), seed in dropped_pair_seeds.items():
        if u not in self_seeds:
            raise ValueError(f"pair ({u}, {d}): node {u} is not a survivor (no self seed)")
        if d in self_seeds:
            raise ValueError(f"pair ({u}, {d}): node {d} is a survivor, its masks cancel")
        # survivor u added +PRG if u < d else −PRG: subtract exactly that
        out -= pairwise_mask(seed, arr.shape, own_id=u, peer_id=d, modulus_bits=modulus_bits)
    return reduce_mod(out, modulus_bits)


def _public_key(keys: Mapping[int, bytes], node: int) -> bytes:
    try:
        return keys[node]
    except KeyError:
        raise ValueError(f"node {node}: no advertised mask public key") from None
