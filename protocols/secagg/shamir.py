"""t-out-of-n Shamir secret sharing of 32-byte secrets (Shamir, CACM 1979).

Secure aggregation shares two secrets of every client among its peers (Bonawitz et al.,
CCS 2017, §4, round 1): the self-mask seed ``b_u`` and the mask private key ``s_u``. Any
``threshold`` shares reconstruct a secret; fewer reveal nothing about it (information-
theoretically). Arithmetic is in the prime field of the Mersenne prime ``p = 2**521 − 1``,
with Python integers; share ``x`` coordinates are the holders' node ids (``1 ≤ id < 2**64``,
so they are distinct and non-zero mod ``p``).

A share serialises to :data:`SHARE_BYTES` = 74 bytes: the holder id (8 bytes, big-endian) and
the polynomial value (66 bytes, big-endian). The id inside is checked against the id the share
is filed under, so a mislabelled share is refused instead of silently changing the secret.

The constant term of the polynomial is the secret followed by its check value
``SHA-256(label | secret)`` (512 bits, below ``p``), and :func:`combine` interpolates through
*every* share it is given. A share inconsistent with the others (a flipped bit, a share filed
under the wrong id, a stale share) shifts the constant term by a non-zero field element, so the
check value no longer matches and the shares are refused instead of yielding a wrong secret;
a holder who does not know the secret cannot craft a shift that passes either. Any
``threshold − 1`` shares are still independent of the constant term, so the check value
reveals nothing to them. It does not identify *which* share is bad: that needs verifiable
secret sharing.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

PRIME: Final = (1 << 521) - 1
SECRET_BYTES: Final = 32
_ID_BYTES: Final = 8
_VALUE_BYTES: Final = 66  # ceil(521 / 8)
SHARE_BYTES: Final = _ID_BYTES + _VALUE_BYTES
_MAX_ID: Final = (1 << 64) - 1
_CHECK_LABEL: Final = b"fedtune/shamir/v1|"


class RandomSource(Protocol):
    """What :func:`split` needs from a random source: ``random.SystemRandom`` (the default)
    or, in tests only, a seeded ``random.Random``."""

    def randrange(self, stop: int, /) -> int: ...


def split(
    secret: bytes,
    *,
    threshold: int,
    share_ids: Sequence[int],
    rng: RandomSource | None = None,
) -> dict[int, bytes]:
    """Split a 32-byte ``secret`` into one share per id; any ``threshold`` of them recover it.

    The polynomial's ``threshold − 1`` random coefficients come from ``rng`` (the OS CSPRNG by
    default). ``threshold`` must be at least 2: with 1 every share *is* the secret.
    """
    if not isinstance(secret, bytes):
        raise TypeError(f"secret: expected bytes, got {type(secret).__name__}")
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    ids = list(share_ids)
    _check_ids(ids)
    _check_threshold(threshold)
    if threshold > len(ids):
        raise ValueError(
            f"threshold {threshold} exceeds the number of shares {len(ids)}; "
            f"the secret could never be reconstructed"
        )
    source: RandomSource = random.SystemRandom() if rng is None else rng
    coeffs = [int.from_bytes(secret + _check_value(secret), "big")]
    coeffs += [source.randrange(PRIME) for _ in range(threshold - 1)]
    return {x: _encode(x, _evaluate(coeffs, x)) for x in ids}


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Recover the 32-byte secret from at least ``threshold`` shares (all of them are used).

    Refuses fewer than ``threshold`` shares, id 0, ids outside ``[1, 2**64)``, shares of the
    wrong length or filed under another id, and shares whose interpolation fails the secret's
    check value (see the module docstring).
    """
    _check_threshold(threshold)
    if len(shares) < threshold:
        raise ValueError(
            f"need at least threshold = {threshold} shares to reconstruct, got {len(shares)}"
        )
    _check_ids(list(shares))
    points = [(x, _decode(x, data)) for x, data in shares.items()]
    value = _interpolate_at_zero(points)
    width = 2 * SECRET_BYTES
    packed = value.to_bytes(width, "big") if value < 1 << (8 * width) else bytes(width)
    secret, check = packed[:SECRET_BYTES], packed[SECRET_BYTES:]
    if value >= 1 << (8 * width) or not hmac.compare_digest(check, _check_value(secret)):
        raise ValueError(
            f"the {len(points)} shares are inconsistent: they do not reconstruct a checked "
            f"{SECRET_BYTES}-byte secret (a share is corrupted, stale or filed under the wrong id)"
        )
    return secret


def _check_value(secret: bytes) -> bytes:
    return hashlib.sha256(_CHECK_LABEL + secret).digest()


def _evaluate(coeffs: list[int], x: int) -> int:
    """Horner's rule mod p; ``coeffs[0]`` is the constant term."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _interpolate_at_zero(points: list[tuple[int, int]]) -> int:
    """Lagrange: ``f(0) = Σ_j y_j w_j`` mod p with ``w_j = Π_{m≠j} x_m / (x_m − x_j)``."""
    points = sorted(points)
    weights = _weights_at_zero(tuple(x for x, _ in points))
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % PRIME


@functools.lru_cache(maxsize=256)
def _weights_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange weights at 0 of the sorted ids ``xs``; they depend on the ids only.

    Why cached: in a round of full SecAgg the same survivors answer for every survivor's
    seed, so all n reconstructions share one set of ids. Computing the weights once (O(n²))
    turns each further reconstruction into a dot product (O(n)) instead of O(n²) with an
    inversion per share, which made the coordinator's unmasking grow with n³."""
    total = 1
    for x in xs:
        total = total * x % PRIME
    dens = []
    for j, xj in enumerate(xs):
        den = xj  # w_j = (Π_m x_m / x_j) / Π_{m≠j} (x_m − x_j)
        for m, xm in enumerate(xs):
            if m != j:
                den = den * (xm - xj) % PRIME
        dens.append(den)
    return tuple(total * inv % PRIME for inv in _batch_inverse(dens))


def _batch_inverse(values: list[int]) -> list[int]:
    """Every value's inverse mod p with one modular inversion (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def _encode(x: int, y: int) -> bytes:
    return x.to_bytes(_ID_BYTES, "big") + y.to_bytes(_VALUE_BYTES, "big")


def _decode(x: int, data: bytes) -> int:
    if not isinstance(data, bytes):
        raise TypeError(f"share for id {x}: expected bytes, got {type(data).__name__}")
    if len(data) != SHARE_BYTES:
        raise ValueError(f"share for id {x} must be {SHARE_BYTES} bytes, got {len(data)}")
    inner = int.from_bytes(data[:_ID_BYTES], "big")
    if inner != x:
        raise ValueError(f"share filed under id {x} carries id {inner}")
    y = int.from_bytes(data[_ID_BYTES:], "big")
    if y >= PRIME:
        raise ValueError(f"share for id {x}: value is not reduced mod 2**521 - 1")
    return y


def _check_ids(ids: list[int]) -> None:
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"share ids must be integers, got {x!r}")
        if x == 0:
            raise ValueError("share id 0 is not allowed: the share at x = 0 is the secret")
        if not 1 <= x <= _MAX_ID:
            raise ValueError(f"share id {x} is outside [1, 2**64)")
    dupes = sorted(x for x, count in Counter(ids).items() if count > 1)
    if dupes:
        raise ValueError(f"duplicate share ids: {dupes}")


def _check_threshold(threshold: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"threshold: expected an integer, got {threshold!r}")
    if threshold < 2:
        raise ValueError(
            f"threshold must be at least 2, got {threshold}: with 1 every share is the secret"
        )
