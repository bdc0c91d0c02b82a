"""Shamir sharing: any t shares recover the secret, t−1 never do, bad inputs are named."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.secagg.shamir import PRIME, SHARE_BYTES, combine, split


@st.composite
def _sharings(draw: st.DrawFn) -> tuple[int, list[int], bytes, int]:
    n = draw(st.integers(2, 12))
    t = draw(st.integers(2, n))
    ids = draw(st.lists(st.integers(1, 2**64 - 1), min_size=n, max_size=n, unique=True))
    secret = draw(st.binary(min_size=32, max_size=32))
    return t, ids, secret, draw(st.integers(0, 2**32))


@settings(max_examples=80, deadline=None)
@given(_sharings(), st.randoms(use_true_random=False))
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(
    sharing: tuple[int, list[int], bytes, int], pick: random.Random
) -> None:
    # Prepare
    t, ids, secret, seed = sharing
    shares = split(secret, threshold=t, share_ids=ids, rng=random.Random(seed))
    subset = pick.sample(ids, t)
    fewer = subset[:-1]
    # Execute / Assert: any t (and all n) shares recover the secret
    assert combine({i: shares[i] for i in subset}, threshold=t) == secret
    assert combine(shares, threshold=t) == secret
    # t − 1 shares are refused under the true threshold ...
    with pytest.raises(ValueError, match=f"need at least threshold = {t} shares"):
        combine({i: shares[i] for i in fewer}, threshold=t)
    # ... and, claimed to be enough, give anything but the secret (almost surely refused)
    if t - 1 >= 2:
        try:
            wrong = combine({i: shares[i] for i in fewer}, threshold=t - 1)
        except ValueError as exc:
            assert "shares are inconsistent" in str(exc)
        else:
            assert wrong != secret


def test_shares_have_fixed_length_and_carry_their_id() -> None:
    shares = split(bytes(range(32)), threshold=3, share_ids=[5, 2**64 - 1, 7],
                   rng=random.Random(0))
    assert list(shares) == [5, 2**64 - 1, 7]
    for x, data in shares.items():
        assert len(data) == SHARE_BYTES == 74
        assert int.from_bytes(data[:8], "big") == x
        assert int.from_bytes(data[8:], "big") < PRIME


def test_split_is_deterministic_under_an_injected_rng_and_random_by_default() -> None:
    secret = bytes(range(32))
    args = {"threshold": 2, "share_ids": [1, 2, 3]}
    assert split(secret, rng=random.Random(1), **args) == split(  # type: ignore[arg-type]
        secret, rng=random.Random(1), **args  # type: ignore[arg-type]
    )
    assert split(secret, **args) != split(secret, **args)  # type: ignore[arg-type]


def test_threshold_shares_of_two_secrets_under_the_same_rng_differ() -> None:
    # the secret enters the constant term; with the same coefficients every share moves
    a = split(bytes(32), threshold=2, share_ids=[1, 2], rng=random.Random(3))
    b = split(bytes(31) + b"\x01", threshold=2, share_ids=[1, 2], rng=random.Random(3))
    assert all(a[i] != b[i] for i in (1, 2))


@pytest.mark.parametrize(
    ("secret", "threshold", "ids", "exc", "message"),
    [
        (bytes(31), 2, [1, 2], ValueError, "secret must be 32 bytes, got 31"),
        (bytes(32), 2, [1, 0, 2], ValueError,
         "share id 0 is not allowed: the share at x = 0 is the secret"),
        (bytes(32), 2, [1, 2, 1, 3, 2], ValueError, "duplicate share ids: [1, 2]"),
        (bytes(32), 4, [1, 2, 3], ValueError,
         "threshold 4 exceeds the number of shares 3; the secret could never be reconstructed"),
        (bytes(32), 1, [1, 2, 3], ValueError,
         "threshold must be at least 2, got 1: with 1 every share is the secret"),
        (bytes(32), 2, [1, 2**64], ValueError, "share id 18446744073709551616 is outside"),
        (bytes(32), 2, [1, -4], ValueError, "share id -4 is outside [1, 2**64)"),
        (bytes(32), 2, [1, True], TypeError, "share ids must be integers, got True"),
        ("x" * 32, 2, [1, 2], TypeError, "secret: expected bytes, got str"),
    ],
)
def test_split_refusals_are_precise(
    secret: bytes, threshold: int, ids: list[int], exc: type, message: str
) -> None:
    with pytest.raises(exc, match=f"^{re.escape(message)}"):
        split(secret, threshold=threshold, share_ids=ids)


def test_combine_refusals_are_precise() -> None:
    secret = bytes(range(32))
    shares = split(secret, threshold=3, share_ids=[4, 5, 6, 7], rng=random.Random(0))
    cases: list[tuple[dict[int, bytes], str]] = [
        ({4: shares[4], 5: shares[5]}, "need at least threshold = 3 shares to reconstruct, got 2"),
        ({4: shares[4], 5: shares[5], 7: shares[6]}, "share filed under id 7 carries id 6"),
        ({4: shares[4], 5: shares[5], 6: shares[6][:-1]},
         "share for id 6 must be 74 bytes, got 73"),
        ({4: shares[4], 5: shares[5], 0: shares[6]}, "share id 0 is not allowed"),
        ({4: shares[4], 5: shares[5], 6: shares[6][:8] + b"\xff" * 66},
         "share for id 6: value is not reduced mod 2**521 - 1"),
    ]
    for given_shares, message in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            combine(given_shares, threshold=3)


def test_a_corrupted_share_is_detected_not_returned_as_a_wrong_secret() -> None:
    # small ids make the Lagrange weights small integers: a flipped low bit would shift a bare
    # secret by -24 and pass unnoticed; the check value catches it
    secret = bytes(range(32))
    shares = split(secret, threshold=3, share_ids=[4, 5, 6, 7], rng=random.Random(0))
    bad = bytearray(shares[5])
    bad[-1] ^= 1
    with pytest.raises(ValueError, match=r"^the 3 shares are inconsistent"):
        combine({4: shares[4], 5: bytes(bad), 6: shares[6]}, threshold=3)
    # every share is used: one bad share among more than t still refuses
    with pytest.raises(ValueError, match=r"^the 4 shares are inconsistent"):
        combine({**shares, 5: bytes(bad)}, threshold=3)
    # a share from another sharing of the same secret (a stale share) is refused too
    stale = split(secret, threshold=3, share_ids=[4, 5, 6, 7], rng=random.Random(1))
    with pytest.raises(ValueError, match=r"^the 3 shares are inconsistent"):
        combine({4: shares[4], 5: stale[5], 6: shares[6]}, threshold=3)
