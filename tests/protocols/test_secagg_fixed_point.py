"""Fixed-point encoding: round trips and sums within n·0.5/scale, overflow refused up front."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protocols.secagg.fixed_point import check_headroom, decode_sum, encode, error_bound

F32_EPS = float(np.finfo(np.float32).eps)


def _vectors(n: int, dim: int) -> st.SearchStrategy[list[np.ndarray]]:
    # values up to ±3 with clip = 2: some coordinates are clipped
    vec = arrays(np.float32, dim, elements=st.floats(-3, 3, width=32))
    return st.lists(vec, min_size=n, max_size=n)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([32, 64]),
    st.sampled_from([2.0**8, 2.0**16, 1000.0]),
    st.integers(1, 8).flatmap(lambda n: _vectors(n, 17)),
)
def test_sum_of_encodings_decodes_within_bound(
    modulus_bits: int, scale: float, xs: list[np.ndarray]
) -> None:
    # Prepare
    n, clip = len(xs), 2.0
    # Execute: wrapping sum of the encodings, as the unmasked aggregate arrives
    total = sum(
        (encode(x, scale=scale, clip=clip, modulus_bits=modulus_bits, num_clients=n) for x in xs),
        start=np.zeros(17, dtype=np.uint32 if modulus_bits == 32 else np.uint64),
    )
    got = decode_sum(total, scale=scale, clip=clip, modulus_bits=modulus_bits, num_clients=n)
    # Assert: against the float64 sum of the clipped inputs, computed independently
    expected = np.sum([np.clip(x.astype(np.float64), -clip, clip) for x in xs], axis=0)
    tol = error_bound(num_clients=n, scale=scale) + F32_EPS * np.abs(expected)
    assert got.dtype == np.float32
    assert np.all(np.abs(got.astype(np.float64) - expected) <= tol)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(0, 40), elements=st.floats(-1, 1, width=32)))
def test_round_trip_single_client(x: np.ndarray) -> None:
    enc = encode(x, scale=2.0**20, clip=1.0, modulus_bits=32, num_clients=1)
    back = decode_sum(enc, scale=2.0**20, clip=1.0, modulus_bits=32, num_clients=1)
    assert enc.dtype == np.uint32 and enc.shape == x.shape
    assert np.all(np.abs(back - x) <= 0.5 / 2.0**20 + F32_EPS * np.abs(x))


def test_negative_values_are_twos_complement() -> None:
    enc32 = encode(np.array([-1.0, 1.0, 0.0]), scale=1.0, clip=1.0, modulus_bits=32,
                   num_clients=1)
    enc64 = encode(np.array([-1.0]), scale=1.0, clip=1.0, modulus_bits=64, num_clients=1)
    np.testing.assert_array_equal(enc32, np.array([2**32 - 1, 1, 0], dtype=np.uint32))
    np.testing.assert_array_equal(enc64, np.array([2**64 - 1], dtype=np.uint64))


def test_rounding_is_to_nearest_ties_to_even() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49], dtype=np.float32)
    enc = encode(x, scale=1.0, clip=3.0, modulus_bits=32, num_clients=1)
    assert enc.view(np.int32).tolist() == [0, 2, 2, 0, -2, 0]


def test_clipping_is_applied_before_scaling() -> None:
    enc = encode(np.array([10.0, -10.0]), scale=4.0, clip=1.5, modulus_bits=32, num_clients=1)
    assert enc.view(np.int32).tolist() == [6, -6]


def test_overflow_is_refused_with_the_numbers_and_what_to_lower() -> None:
    msg = (
        "fixed-point sum can overflow: num_clients * clip * scale = 2 * 1.0 * 1073741824.0 = "
        "2147483648 (rounded up) is not below 2**31 = 2147483648; lower scale or clip, "
        "or use modulus_bits=64"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        check_headroom(num_clients=2, clip=1.0, scale=2.0**30, modulus_bits=32)
    with pytest.raises(ValueError, match="fixed-point sum can overflow"):
        encode(np.zeros(3), scale=2.0**30, clip=1.0, modulus_bits=32, num_clients=2)
    # just below the limit passes; 64 bits has room
    check_headroom(num_clients=1, clip=1.0, scale=2.0**31 - 1, modulus_bits=32)
    check_headroom(num_clients=2, clip=1.0, scale=2.0**30, modulus_bits=64)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"modulus_bits": 48}, ValueError, "modulus_bits must be 2 to 32 or 64, got 48"),
        ({"scale": 0.0}, ValueError, "scale must be finite and > 0, got 0.0"),
        ({"clip": float("inf")}, ValueError, "clip must be finite and > 0, got inf"),
        ({"num_clients": 0}, ValueError, "num_clients must be a positive integer, got 0"),
        ({"scale": "1"}, TypeError, "scale: expected a number, got str"),
    ],
)
def test_bad_parameters_are_named(kwargs: dict[str, object], exc: type, message: str) -> None:
    params: dict[str, object] = {"scale": 2.0**10, "clip": 1.0, "modulus_bits": 32,
                                 "num_clients": 4, **kwargs}
    with pytest.raises(exc, match=f"^{re.escape(message)}$"):
        encode(np.zeros(2), **params)  # type: ignore[arg-type]


def test_non_finite_and_integer_inputs_are_refused() -> None:
    params = {"scale": 2.0**10, "clip": 1.0, "modulus_bits": 32, "num_clients": 1}
    with pytest.raises(ValueError, match=r"^x: 2 coordinates are NaN or infinite; refusing"):
        encode(np.array([np.nan, 1.0, np.inf]), **params)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="x: expected a floating-point array, got dtype int64"):
        encode(np.array([1, 2], dtype=np.int64), **params)  # type: ignore[arg-type]


def test_decode_refuses_wrong_dtype_and_out_of_range_sums() -> None:
    params = {"scale": 2.0**10, "clip": 1.0, "modulus_bits": 32, "num_clients": 3}
    with pytest.raises(TypeError, match="s: expected dtype uint32 for modulus_bits=32, got"):
        decode_sum(np.zeros(2, dtype=np.uint64), **params)  # type: ignore[arg-type]
    # a leftover mask looks like a uniformly random word: far outside ±3·1024
    garbage = np.array([0, 3072, 2**32 - 3072, 123456789], dtype=np.uint32)
    with pytest.raises(ValueError, match=r"1 of 4 coordinates outside ±\(num_clients \* ceil"):
        decode_sum(garbage, **params)  # type: ignore[arg-type]
    # integer noise widens the band by its bound, and a band beyond the modulus is refused
    wide = decode_sum(garbage[:3], noise_bound=100, **params)
    np.testing.assert_array_equal(wide, np.array([0, 3, -3], dtype=np.float32))
    with pytest.raises(ValueError, match=r"1 of 2 coordinates outside ±\(.*\) = ±3172"):
        decode_sum(np.array([3172, 3173], dtype=np.uint32), noise_bound=100, **params)
    with pytest.raises(ValueError, match="does not fit 32 signed bits"):
        decode_sum(garbage, noise_bound=2**31, **params)


def test_error_bound_formula() -> None:
    assert error_bound(num_clients=10, scale=2.0**16) == 10 * 0.5 / 65536
