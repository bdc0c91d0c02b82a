"""k-bit packing (protocols/bitpack.py): exact round trips for every width, golden bytes,
and strict unpacking of untrusted bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import bitpack
from protocols.errors import InvalidUpdate


@pytest.mark.parametrize("bits", range(1, 33))
def test_every_width_round_trips_in_the_fewest_bytes(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for count in (0, 1, 7, 8, 9, 1000):
        values = rng.integers(0, 2**bits, size=count, dtype=np.uint64)
        packed = bitpack.pack(values, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
        back = bitpack.unpack(packed, bits, count, what="v")
        assert back.dtype == np.uint32 and np.array_equal(back, values)


def test_golden_layout_is_little_endian_in_bits_and_bytes() -> None:
    assert bitpack.pack(np.array([1, 2, 3]), 2).tolist() == [0b111001]
    assert bitpack.pack(np.array([5, 2]), 3).tolist() == [0b010101]
    assert bitpack.pack(np.array([0x1FF]), 9).tolist() == [0xFF, 0x01]


def test_untrusted_bytes_are_refused_with_what_was_wrong() -> None:
    with pytest.raises(InvalidUpdate, match=r"`v`: expected uint8\[2\]"):
        bitpack.unpack(np.zeros(3, np.uint8), 5, 3, what="v")
    with pytest.raises(InvalidUpdate, match="padding bits"):
        bitpack.unpack(np.array([0, 0x80], np.uint8), 5, 3, what="v")
    with pytest.raises(ValueError, match="values must be integers"):
        bitpack.pack(np.array([4]), 2)


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 32), data=st.binary(max_size=64))
def test_any_bytes_unpack_to_values_that_pack_back_to_them(bits: int, data: bytes) -> None:
    raw = np.frombuffer(data, np.uint8)
    count = raw.size * 8 // bits
    try:
        values = bitpack.unpack(raw, bits, count, what="v")
    except InvalidUpdate:
        return
    assert np.array_equal(bitpack.pack(values, bits), raw)


@pytest.mark.parametrize("bits", [3, 7, 13, 31])
def test_vectors_longer_than_one_chunk_round_trip(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 2**bits, size=bitpack.CHUNK * 2 + 5,
                                                  dtype=np.uint64)
    packed = bitpack.pack(values, bits)
    assert packed.size == -(-values.size * bits // 8)
    assert np.array_equal(bitpack.unpack(packed, bits, values.size, what="v"), values)
