"""Fp32 codec: exact round trip, strict decoding of untrusted records, registry errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protocols.codecs import (
    Fp32Codec,
    from_record,
    get_codec,
    record_nbytes,
    register_codec,
    to_record,
)
from protocols.errors import InvalidUpdate

tensor = arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(1, 6)),
    elements=st.floats(-1e6, 1e6, width=32),
)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=12), tensor, max_size=4))
def test_fp32_round_trip_is_exact(tensors: dict[str, np.ndarray]) -> None:
    decoded = from_record(to_record(tensors))
    assert decoded.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(decoded[key], value)
        assert decoded[key].dtype == np.float32


def test_encode_casts_float64_to_float32() -> None:
    record = to_record({"w": np.ones((2, 3), dtype=np.float64)})
    assert record["w"].dtype == "float32"
    assert record_nbytes(record) >= 2 * 3 * 4


def _npy(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (Array(dtype="float32", shape=(2,), stype="torch.raw", data=b"xx"), "serialisation"),
        (Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"garbage"), "not a valid"),
        (Array(np.zeros(2, dtype=np.float64)), "expected dtype float32"),
        (Array(np.zeros(2, dtype=np.int32)), "expected dtype float32"),
        (
            Array(dtype="float32", shape=(3,), stype="numpy.ndarray",
                  data=_npy(np.zeros(2, np.float32))),
            "header says shape (3,)",
        ),
    ],
)
def test_decode_rejects_malformed_arrays(array: Array, message: str) -> None:
    with pytest.raises(InvalidUpdate, match=r"`w`") as err:
        from_record(ArrayRecord({"w": array}))
    assert message in err.value.reason


def test_unknown_codec_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown update codec 'zip'; valid codecs: bf16, fp16, "
                                         r"fp32, int2, int3, int4, int8, seed-scalar, sign1, topk"):
        get_codec("zip")


def test_register_refuses_to_replace() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_codec("fp32", Fp32Codec)
