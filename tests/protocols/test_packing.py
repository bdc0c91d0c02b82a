"""Packing an adapter record into one wire array (protocols/packing.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from protocols.codecs import from_record, to_record
from protocols.errors import InvalidUpdate
from protocols.packing import PACKED_KEY, is_packed, pack_record, unpack_record


def _blob(record: ArrayRecord) -> bytes:
    return record[PACKED_KEY].numpy().tobytes()


def _record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, dtype=np.uint8))})


def test_golden_bytes() -> None:
    record = ArrayRecord({"w": Array(np.array([[1.0, -2.0]], dtype="<f4")),
                          "s": Array(np.array([7], dtype="<u8"))})

    blob = _blob(pack_record(record))

    index = b'[{"name":"w","dtype":"<f4","shape":[1,2]},{"name":"s","dtype":"<u8","shape":[1]}]'
    assert blob == (b"FTPK\x01\x00\x00\x00" + len(index).to_bytes(4, "little") + index
                    + bytes.fromhex("0000803f000000c0") + bytes.fromhex("0700000000000000"))


def test_round_trip_keeps_names_order_dtypes_shapes_and_values() -> None:
    rng = np.random.default_rng(0)
    tensors = {"a.lora_A.weight": rng.normal(size=(4, 8)).astype(np.float32),
               "a.lora_B.weight": np.zeros((8, 4), np.float32),
               "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}
    record = to_record(tensors)
    extra = {"seeds": np.array([1, 2**63], dtype="<u8"), "hdr": np.array([1, -3], dtype="<i8")}
    for key, value in extra.items():
        record[key] = Array(value)

    unpacked = unpack_record(pack_record(record))

    assert list(unpacked.keys()) == list(record.keys())
    for key in record:
        assert unpacked[key].data == record[key].data  # the same .npy bytes as unpacked
    decoded = from_record(ArrayRecord({k: unpacked[k] for k in tensors}))
    for key, value in tensors.items():
        np.testing.assert_array_equal(decoded[key], value)


def test_a_record_travels_as_three_objects_whatever_its_size() -> None:
    rng = np.random.default_rng(1)  # distinct tensors: Flower's objects are content-addressed
    record = to_record({f"t{i}": rng.normal(size=(4, 4)).astype(np.float32)
                                 for i in range(60)})

    plain = len(get_all_nested_objects(record))
    packed = len(get_all_nested_objects(pack_record(record)))

    assert plain >= 2 * 60 + 1 and packed == 3


def test_an_unpacked_record_passes_through() -> None:
    record = to_record({"w": np.ones((2, 2), np.float32)})

    assert not is_packed(record) and unpack_record(record) is record


def test_packing_refuses_a_dtype_the_reader_would_refuse() -> None:
    with pytest.raises(ValueError, match=">f4 cannot be packed"):
        pack_record(ArrayRecord({"w": Array(np.ones(2, dtype=">f4"))}))


def _good() -> bytes:
    return _blob(pack_record(ArrayRecord({"w": Array(np.ones((2, 3), np.float32)),
                                          "v": Array(np.ones(4, np.float32))})))


def _with_index(index: object, payload: bytes | None = None) -> bytes:
    blob = _good()
    length = int.from_bytes(blob[8:12], "little")
    header = json.dumps(index).encode()
    return (blob[:8] + len(header).to_bytes(4, "little") + header
            + (blob[12 + length:] if payload is None else payload))


W, V = {"name": "w", "dtype": "<f4", "shape": [2, 3]}, {"name": "v", "dtype": "<f4", "shape": [4]}


@pytest.mark.parametrize(("blob", "message"), [
    (_good()[:5], "shorter than its 12-byte prefix"),
    (b"FTPX" + _good()[4:], "bad magic"),
    (_good()[:4] + b"\x02" + _good()[5:], "format version 2"),
    (_good()[:8] + (2**20 + 1).to_bytes(4, "little") + _good()[12:], "does not fit"),
    (_good()[:-1], "`v` (float32[4]) needs 16 bytes, 15 remain"),
    (_good() + b"\0", "1 bytes after the last tensor"),
    (_with_index("not a list"), "must be a list"),
    (_with_index([W, V, W]), "`w` appears twice"),
    (_with_index([W, {**V, "dtype": ">f4"}]), "dtype '>f4' is not one of"),
    (_with_index([W, {**V, "dtype": "|O"}]), "dtype '|O' is not one of"),
    (_with_index([W, {**V, "shape": [-4]}]), "shape must be a list"),
    (_with_index([W, {**V, "shape": [True, 4]}]), "shape must be a list"),
    (_with_index([W, {**V, "shape": [1] * 9}]), "shape must be a list"),
    (_with_index([W, {**V, "name": PACKED_KEY}]), "bad name"),
    (_with_index([W, {**V, "extra": 1}]), "expected exactly name, dtype and shape"),
    (_with_index([W, {**V, "shape": [2**39, 2**39]}]), "remain"),
])
def test_malformed_packing_is_refused_with_the_reason(blob: bytes, message: str) -> None:
    with pytest.raises(InvalidUpdate, match="fedtune-packed") as err:
        unpack_record(_record(blob))
    assert message in str(err.value)


def test_a_packed_record_holds_nothing_else() -> None:
    record = pack_record(ArrayRecord({"w": Array(np.ones(2, np.float32))}))
    record["smuggled"] = Array(np.ones(2, np.float32))

    with pytest.raises(InvalidUpdate, match=r"it also has \['smuggled'\]"):
        unpack_record(record)


def test_the_packed_array_itself_must_be_bytes() -> None:
    record = ArrayRecord({PACKED_KEY: Array(np.zeros(8, np.float32))})

    with pytest.raises(InvalidUpdate, match="expected a 1-D uint8 array, got float32"):
        unpack_record(record)
