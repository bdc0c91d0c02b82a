"""Masks from 32-byte seeds: the one-time pads of secure aggregation.

A client ``u`` uploads (Bonawitz et al., CCS 2017, §4, round 2)::

    y_u = x_u + PRG(b_u) + Σ_{v < u} PRG(s_uv) − Σ_{v > u} PRG(s_uv)      (mod 2**k)

where ``x_u`` is its fixed-point input (:mod:`protocols.secagg.fixed_point`), ``b_u`` a fresh
random *self* seed and ``s_uv = s_vu`` the pairwise seed agreed with peer ``v``
(:func:`protocols.secagg.keys.pair_key`). Summed over all clients the pairwise terms cancel;
the coordinator removes the self masks from ``b_u`` shares. With SecAgg+ (Bell et al.,
CCS 2020) ``v`` ranges over ``u``'s neighbours in a sparse graph instead of everyone; the
arithmetic is the same.

The PRG is the ChaCha20 keystream (RFC 8439) keyed by the *full* 256-bit seed, nonce zero,
read as little-endian ``k``-bit words (uniform mod ``2**k`` because the modulus is a power of
two). Flower's legacy SecAgg+ folds the seed to 32 bits for numpy's Mersenne Twister, which
leaves 2**32 possible masks; here the mask is as strong as the seed. A zero nonce is sound
because every seed is used for exactly one vector (one per round, per pair or per client);
never mask two vectors with one seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from protocols.secagg.fixed_point import UIntArray, reduce_mod, uint_dtype

SEED_BYTES: Final = 32
_ZERO_NONCE: Final = bytes(16)  # cryptography's 16-byte ChaCha20 nonce: counter 0, nonce 0
_CHUNK_BYTES: Final = 1 << 24  # keystream in 16 MiB pieces: bounded scratch memory


def new_seed() -> bytes:
    """A fresh 32-byte seed from the OS CSPRNG (a client's self-mask seed ``b_u``)."""
    return os.urandom(SEED_BYTES)


def prg_mask(seed: bytes, shape: int | tuple[int, ...], *, modulus_bits: int) -> UIntArray:
    """Uniform integers mod ``2**modulus_bits`` of the given shape, determined by ``seed``.

    Same seed, same shape → same array on every platform (explicit little-endian words).
    """
    dtype = uint_dtype(modulus_bits)
    if not isinstance(seed, bytes):
        raise TypeError(f"seed: expected bytes, got {type(seed).__name__}")
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ValueError(f"shape must hold non-negative integers, got {shape!r}")
    out = np.empty(math.prod(dims), dtype=dtype)
    raw = out.view(np.uint8)
    encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    zeros = bytes(min(_CHUNK_BYTES, raw.size))
    for start in range(0, raw.size, _CHUNK_BYTES):
        stop = min(start + _CHUNK_BYTES, raw.size)
        raw[start:stop] = np.frombuffer(encryptor.update(zeros[: stop - start]), dtype=np.uint8)
    if not np.little_endian:
        out.byteswap(inplace=True)  # the keystream is read as little-endian words everywhere
    return reduce_mod(out, modulus_bits).reshape(dims)


def self_mask(seed: bytes, shape: int | tuple[int, ...], *, modulus_bits: int) -> UIntArray:
    """The self mask ``PRG(b_u)``: added by the client, subtracted by the coordinator."""
    return prg_mask(seed, shape, modulus_bits=modulus_bits)


def pairwise_mask(
    seed: bytes, shape: int | tuple[int, ...], *, own_id: int, peer_id: int, modulus_bits: int
) -> UIntArray:
    """``+PRG(s_uv)`` if ``own_id < peer_id`` else ``−PRG(s_uv)`` (mod ``2**k``).

    The lower node id adds, the higher subtracts, so the two masks of a pair cancel in a sum.
    """
    if own_id == peer_id:
        raise ValueError(f"own_id and peer_id must differ, got {own_id} for both")
    mask = prg_mask(seed, shape, modulus_bits=modulus_bits)
    if own_id > peer_id:
        np.negative(mask, out=mask)  # unsigned negation wraps: 2**k − m
    return reduce_mod(mask, modulus_bits)


def masked_input(
    x_enc: npt.NDArray[Any],
    *,
    own_id: int,
    peers: Mapping[int, bytes],
    self_seed: bytes,
    modulus_bits: int,
) -> UIntArray:
    """``x_enc + PRG(self_seed) ± Σ PRG(peers[v])`` mod ``2**k``: what a client uploads.

    ``peers`` maps each peer's node id to the pairwise seed shared with it (everyone in
    SecAgg, the neighbours in SecAgg+). Masks are added one at a time, so peak memory is two
    extra vectors whatever the number of peers. ``x_enc`` is not modified.
    """
    dtype = uint_dtype(modulus_bits)
    arr = np.asarray(x_enc)
    if arr.dtype != dtype:
        raise TypeError(
            f"x_enc: expected dtype {dtype} for modulus_bits={modulus_bits}, got {arr.dtype}"
        )
    if own_id in peers:
        raise ValueError(f"peers must not include own_id {own_id}")
    if self_seed in peers.values():
        raise ValueError("self_seed equals a pairwise seed; seeds must be independent")
    out = arr.copy()
    out += self_mask(self_seed, arr.shape, modulus_bits=modulus_bits)
    for peer_id, seed in peers.items():
        mask = prg_mask(seed, arr.shape, modulus_bits=modulus_bits)
        if own_id < peer_id:
            out += mask
        else:
            out -= mask
    return reduce_mod(out, modulus_bits)
