"""ChaCha20 masks: pinned keystream, determinism, 32-byte seeds only, pairwise masks cancel."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.secagg import masks
from protocols.secagg.masks import masked_input, pairwise_mask, prg_mask, self_mask

# RFC 8439 appendix A.1, test vector #1: ChaCha20 with key 0^32, nonce 0^12, counter 0;
# the first 16 keystream bytes read as little-endian words.
ZERO_KEY_STREAM = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28")
DTYPES = {32: np.uint32, 64: np.uint64}


def test_prg_is_the_chacha20_keystream_as_little_endian_words() -> None:
    np.testing.assert_array_equal(
        prg_mask(bytes(32), 4, modulus_bits=32),
        np.array([0xADE0B876, 0x903DF1A0, 0xE56A5D40, 0x28BD8653], dtype=np.uint32),
    )
    np.testing.assert_array_equal(
        prg_mask(bytes(32), (2,), modulus_bits=64),
        np.frombuffer(ZERO_KEY_STREAM, dtype="<u8").astype(np.uint64),
    )


def test_same_seed_same_mask_different_seed_different_mask() -> None:
    seed, other = bytes(range(32)), bytes(range(1, 33))
    a = prg_mask(seed, (3, 5), modulus_bits=32)
    assert a.shape == (3, 5) and a.dtype == np.uint32
    np.testing.assert_array_equal(a, prg_mask(seed, (3, 5), modulus_bits=32))
    assert np.count_nonzero(a != prg_mask(other, (3, 5), modulus_bits=32)) >= 14
    # a longer mask extends a shorter one: the keystream is one stream per seed
    np.testing.assert_array_equal(prg_mask(seed, 100, modulus_bits=32)[:15], a.ravel())


def test_every_seed_byte_matters() -> None:
    # Flower's legacy PRG folds the seed to 32 bits: seeds equal after the fold collide.
    seed = bytes(range(32))
    folded_twin = bytes([seed[0] ^ 1]) + seed[1:4] + bytes([seed[4] ^ 1]) + seed[5:]
    assert not np.array_equal(prg_mask(seed, 8, modulus_bits=32),
                              prg_mask(folded_twin, 8, modulus_bits=32))


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_seeds_other_than_32_bytes_are_refused(length: int) -> None:
    with pytest.raises(ValueError, match=f"^seed must be 32 bytes, got {length}$"):
        prg_mask(bytes(length), 4, modulus_bits=32)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match=r"^seed: expected bytes, got str$"):
        prg_mask("0" * 32, 4, modulus_bits=32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^modulus_bits must be 2 to 32 or 64, got 1$"):
        prg_mask(bytes(32), 4, modulus_bits=1)
    with pytest.raises(ValueError, match=re.escape("shape must hold non-negative integers")):
        prg_mask(bytes(32), (2, -1), modulus_bits=32)
    assert prg_mask(bytes(32), (0,), modulus_bits=32).shape == (0,)


def test_chunked_keystream_equals_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = bytes(range(32))
    whole = prg_mask(seed, 1000, modulus_bits=64)
    monkeypatch.setattr(masks, "_CHUNK_BYTES", 24)  # not a multiple of the 64-byte block
    np.testing.assert_array_equal(prg_mask(seed, 1000, modulus_bits=64), whole)


def test_mask_words_look_uniform() -> None:
    m = prg_mask(bytes(range(32)), 100_000, modulus_bits=32).astype(np.float64) / 2.0**32
    assert abs(m.mean() - 0.5) < 0.01 and abs(m.var() - 1 / 12) < 0.005


def test_pairwise_sign_convention() -> None:
    seed, shape = bytes(range(32)), (7,)
    low = pairwise_mask(seed, shape, own_id=3, peer_id=9, modulus_bits=32)
    high = pairwise_mask(seed, shape, own_id=9, peer_id=3, modulus_bits=32)
    np.testing.assert_array_equal(low, prg_mask(seed, shape, modulus_bits=32))  # lower adds
    np.testing.assert_array_equal(low + high, np.zeros(shape, dtype=np.uint32))
    with pytest.raises(ValueError, match=r"^own_id and peer_id must differ, got 3 for both$"):
        pairwise_mask(seed, shape, own_id=3, peer_id=3, modulus_bits=32)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.sampled_from([32, 64]), st.integers(0, 2**32))
def test_pairwise_masks_cancel_in_the_sum(n: int, modulus_bits: int, seed: int) -> None:
    # Prepare: n clients with random ids, inputs, self seeds and one seed per pair
    rnd = random.Random(seed)
    dtype, shape = DTYPES[modulus_bits], (3, 11)
    ids = rnd.sample(range(1, 2**63), n)
    pair_seed = {frozenset(p): rnd.randbytes(32) for p in itertools.combinations(ids, 2)}
    inputs = {u: np.array([rnd.getrandbits(modulus_bits) for _ in range(33)], dtype=dtype)
              .reshape(shape) for u in ids}
    self_seeds = {u: rnd.randbytes(32) for u in ids}
    # Execute
    uploads = [
        masked_input(inputs[u], own_id=u, self_seed=self_seeds[u], modulus_bits=modulus_bits,
                     peers={v: pair_seed[frozenset((u, v))] for v in ids if v != u})
        for u in ids
    ]
    total = np.sum(uploads, axis=0, dtype=dtype)
    for u in ids:
        total -= self_mask(self_seeds[u], shape, modulus_bits=modulus_bits)
    # Assert: exactly the sum of the inputs mod 2**k, while no upload equals its input
    np.testing.assert_array_equal(total, np.sum(list(inputs.values()), axis=0, dtype=dtype))
    assert all(not np.array_equal(up, inputs[u]) for up, u in zip(uploads, ids, strict=True))


def test_masked_input_checks_and_leaves_its_input_alone() -> None:
    x = np.arange(5, dtype=np.uint32)
    kept = x.copy()
    masked_input(x, own_id=1, peers={2: bytes(32)}, self_seed=bytes(range(32)), modulus_bits=32)
    np.testing.assert_array_equal(x, kept)
    with pytest.raises(TypeError, match="x_enc: expected dtype uint64 for modulus_bits=64, got "
                                        "uint32"):
        masked_input(x, own_id=1, peers={}, self_seed=bytes(32), modulus_bits=64)
    with pytest.raises(ValueError, match=r"^peers must not include own_id 1$"):
        masked_input(x, own_id=1, peers={1: bytes(32)}, self_seed=bytes(32), modulus_bits=32)
    with pytest.raises(ValueError, match=r"^self_seed equals a pairwise seed"):
        masked_input(x, own_id=1, peers={2: bytes(32)}, self_seed=bytes(32), modulus_bits=32)
