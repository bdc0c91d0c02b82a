"""A reference in-memory SecAgg round (Bonawitz et al. 2017) built only from protocols.secagg.

Clients advertise two X25519 keys, Shamir-share their self-mask seed ``b_u`` and mask private
key ``s_u`` through sealed payloads routed by the coordinator, upload masked fixed-point
inputs, and answer one unmask request; some drop before uploading, some after. The
coordinator's unmasked sum must equal the plain sum of the survivors' clipped inputs within
the fixed-point bound, and with more than ``n − t`` clients gone it must refuse.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.secagg import (
    InconsistentRequest,
    check_unmask_request,
    decode_sum,
    dropped_pair_seeds,
    encode,
    error_bound,
    generate_keypair,
    masked_input,
    new_seed,
    open_sealed,
    pair_key,
    private_bytes,
    public_bytes,
    reconstruct_secrets,
    remove_masks,
    seal,
    share_associated_data,
    split,
    sum_masked,
)
from protocols.secagg.shamir import SHARE_BYTES

ROUND, SALT, DIM = 7, b"fedtune-run-0001", 301
CLIP, SCALE = 1.0, 2.0**20


@dataclass
class Client:
    """One client's state across the round (what a client stage would keep)."""

    node_id: int
    x: np.ndarray
    seal_key: X25519PrivateKey = field(default_factory=lambda: generate_keypair()[0])
    mask_key: X25519PrivateKey = field(default_factory=lambda: generate_keypair()[0])
    b: bytes = field(default_factory=new_seed)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (b, s) share


def run_round(
    n: int, t: int, *, drop_before: int, drop_after: int, seed: int, modulus_bits: int = 32
) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (unmasked float32 sum, float64 sum of clipped survivor inputs, survivors)."""
    rnd = random.Random(seed)
    ids = rnd.sample(range(1, 2**63), n)
    data = np.random.default_rng(seed)
    clients = {u: Client(u, (data.standard_normal(DIM) * 0.7).astype(np.float32)) for u in ids}

    # Round 0, AdvertiseKeys: the coordinator relays every client's two public keys.
    seal_pks = {u: public_bytes(c.seal_key.public_key()) for u, c in clients.items()}
    mask_pks = {u: public_bytes(c.mask_key.public_key()) for u, c in clients.items()}

    # Round 1, ShareKeys: shares of b_u and s_u for every client (itself included), each
    # peer's pair sealed under the seal pair key; the coordinator only routes ciphertexts.
    inbox: dict[int, dict[int, bytes]] = {v: {} for v in ids}
    for u, c in clients.items():
        b_shares = split(c.b, threshold=t, share_ids=ids)
        s_shares = split(private_bytes(c.mask_key), threshold=t, share_ids=ids)
        c.held[u] = (b_shares[u], s_shares[u])
        for v in ids:
            if v != u:
                key = pair_key(c.seal_key, seal_pks[v], purpose="seal", round_id=ROUND,
                               own_id=u, peer_id=v, salt=SALT)
                ad = share_associated_data(round_id=ROUND, sender=u, receiver=v)
                inbox[v][u] = seal(key, b_shares[v] + s_shares[v], associated_data=ad)

    # Round 2, MaskedInputCollection: some clients are gone before uploading.
    order = rnd.sample(ids, n)
    gone_before, gone_after = set(order[:drop_before]), set(order[drop_before:][:drop_after])
    masked: dict[int, np.ndarray] = {}
    for u, c in clients.items():
        if u in gone_before:
            continue
        for sender, sealed in inbox[u].items():
            key = pair_key(c.seal_key, seal_pks[sender], purpose="seal", round_id=ROUND,
                           own_id=u, peer_id=sender, salt=SALT)
            ad = share_associated_data(round_id=ROUND, sender=sender, receiver=u)
            plain = open_sealed(key, sealed, associated_data=ad)
            c.held[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
        peers = {v: pair_key(c.mask_key, mask_pks[v], purpose="mask", round_id=ROUND,
                             own_id=u, peer_id=v, salt=SALT) for v in ids if v != u}
        x_enc = encode(c.x, scale=SCALE, clip=CLIP, modulus_bits=modulus_bits, num_clients=n)
        masked[u] = masked_input(x_enc, own_id=u, peers=peers, self_seed=c.b,
                                 modulus_bits=modulus_bits)

    # Round 3, Unmasking: survivors sent input; others drop now and never answer.
    survivors, dropped = set(masked), set(ids) - set(masked)
    b_by_owner: dict[int, dict[int, bytes]] = {v: {} for v in survivors}
    s_by_owner: dict[int, dict[int, bytes]] = {d: {} for d in dropped}
    for u in survivors - gone_after:
        c = clients[u]
        check_unmask_request(survivors=survivors, dropped=dropped, my_peers=set(c.held),
                             threshold=t)
        for v in survivors:
            b_by_owner[v][u] = c.held[v][0]
        for d in dropped:
            s_by_owner[d][u] = c.held[d][1]
    b_seeds = reconstruct_secrets(b_by_owner, threshold=t)
    s_keys = reconstruct_secrets(s_by_owner, threshold=t)
    pair_seeds = dropped_pair_seeds(
        dropped_mask_keys=s_keys, mask_public_keys=mask_pks,
        neighbours={d: set(ids) - {d} for d in dropped}, survivors=survivors,
        round_id=ROUND, salt=SALT,
    )
    total = remove_masks(sum_masked(masked, modulus_bits=modulus_bits), self_seeds=b_seeds,
                         dropped_pair_seeds=pair_seeds, modulus_bits=modulus_bits)
    got = decode_sum(total, scale=SCALE, clip=CLIP, modulus_bits=modulus_bits,
                     num_clients=len(survivors))
    expected = np.sum([np.clip(clients[u].x.astype(np.float64), -CLIP, CLIP)
                       for u in survivors], axis=0)
    return got, expected, len(survivors)


def _assert_within_bound(got: np.ndarray, expected: np.ndarray, survivors: int) -> None:
    tol = error_bound(num_clients=survivors, scale=SCALE) + 2e-7 * np.abs(expected)
    assert got.dtype == np.float32 and got.shape == (DIM,)
    assert np.all(np.abs(got - expected) <= tol)


@pytest.mark.parametrize(
    ("drop_before", "drop_after"),
    [(0, 0), (1, 0), (0, 1), (3, 0), (0, 3), (2, 1), (1, 2)],  # n − t = 3 at most
)
def test_round_recovers_the_plain_sum(drop_before: int, drop_after: int) -> None:
    got, expected, survivors = run_round(7, 4, drop_before=drop_before, drop_after=drop_after,
                                         seed=drop_before * 10 + drop_after)
    assert survivors == 7 - drop_before
    _assert_within_bound(got, expected, survivors)


def test_round_with_a_64_bit_modulus() -> None:
    got, expected, survivors = run_round(5, 3, drop_before=1, drop_after=1, seed=5,
                                         modulus_bits=64)
    _assert_within_bound(got, expected, survivors)


@settings(max_examples=12, deadline=None)
@given(st.integers(3, 8).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(n // 2 + 1, n), st.integers(0, n), st.integers(0, 2**16))))
def test_any_dropout_pattern_within_n_minus_t(case: tuple[int, int, int, int]) -> None:
    n, t, split_point, seed = case
    gone = n - t
    before = min(split_point, gone)
    got, expected, survivors = run_round(n, t, drop_before=before, drop_after=gone - before,
                                         seed=seed)
    _assert_within_bound(got, expected, survivors)


def test_too_few_survivors_make_clients_refuse_to_reveal_shares() -> None:
    # n − t + 1 = 4 gone before uploading: 3 survivors < t = 4
    with pytest.raises(InconsistentRequest,
                       match=r"^only 3 survivors, fewer than the threshold 4$"):
        run_round(7, 4, drop_before=4, drop_after=0, seed=1)


def test_too_few_responders_make_reconstruction_refuse() -> None:
    # 5 survivors uploaded but 2 of them never answer: only 3 shares per secret < t = 4
    with pytest.raises(ValueError, match=r"^node \d+: need at least threshold = 4 shares to "
                                         r"reconstruct, got 3$"):
        run_round(7, 4, drop_before=2, drop_after=2, seed=2)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ({"survivors": {1, 2, 3}, "dropped": {3, 4}},
         "nodes [3] are named both survivor and dropped; revealing both their self-mask and "
         "mask-key shares would expose their inputs"),
        ({"survivors": {1, 2, 3, 9}, "dropped": {4, 8}}, "nodes [8, 9] are not among my peers"),
        ({"survivors": {1, 2}, "dropped": {3, 4, 5}},
         "only 2 survivors, fewer than the threshold 3"),
    ],
)
def test_inconsistent_unmask_requests_are_refused(
    request_: dict[str, set[int]], reason: str
) -> None:
    with pytest.raises(InconsistentRequest) as info:
        check_unmask_request(**request_, my_peers={1, 2, 3, 4, 5}, threshold=3)
    assert info.value.reason == reason == str(info.value)
    assert isinstance(info.value, ValueError)


def test_consistent_unmask_request_passes() -> None:
    check_unmask_request(survivors={1, 2, 3}, dropped={4}, my_peers={1, 2, 3, 4, 5},
                         threshold=3)


def test_a_wrongly_reconstructed_mask_key_is_named() -> None:
    (_, pk_a), (sk_b, _), (_, pk_c) = generate_keypair(), generate_keypair(), generate_keypair()
    with pytest.raises(ValueError, match=r"^node 2: the reconstructed mask key does not match"):
        dropped_pair_seeds(dropped_mask_keys={2: private_bytes(sk_b)},
                           mask_public_keys={1: public_bytes(pk_a), 2: public_bytes(pk_c)},
                           neighbours={2: {1}}, survivors={1}, round_id=ROUND, salt=SALT)


def test_remove_masks_and_sum_masked_check_their_inputs() -> None:
    s = np.zeros(4, dtype=np.uint32)
    with pytest.raises(ValueError, match=r"^pair \(1, 2\): node 1 is not a survivor"):
        remove_masks(s, self_seeds={3: new_seed()}, dropped_pair_seeds={(1, 2): new_seed()},
                     modulus_bits=32)
    with pytest.raises(ValueError, match=r"^pair \(1, 2\): node 2 is a survivor"):
        remove_masks(s, self_seeds={1: new_seed(), 2: new_seed()},
                     dropped_pair_seeds={(1, 2): new_seed()}, modulus_bits=32)
    with pytest.raises(ValueError, match=r"^node 9: expected shape \(4,\), got \(3,\)$"):
        sum_masked({1: s, 9: s[:3]}, modulus_bits=32)
    with pytest.raises(TypeError, match=r"^node 1: expected dtype uint64, got uint32$"):
        sum_masked({1: s}, modulus_bits=64)
    with pytest.raises(ValueError, match=r"^no masked inputs to sum$"):
        sum_masked({}, modulus_bits=32)
