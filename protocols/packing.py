"""One wire object per adapter record: packing an ``ArrayRecord`` into a single array.

Why: Flower 1.41 moves a message as a tree of objects, one request each: every ``Array``
is an object plus at least one chunk. A LoRA adapter is many small tensors (the tiny test
model: 20, 44 objects per message; SmolLM2 with q/v adapters: 120 tensors, ~240 objects),
and both the SuperNode's download from the SuperLink and the ClientApp's from the
SuperNode pull them a few at a time — 0.5–2.3 s per message for the tiny model on
loopback here, before any training (issue #5's latency goal is ≤ 3 s per edge phase). A
record packed here travels as one array: three objects whatever the adapter's size.

The packed payload is parsed as untrusted input, as strictly as :func:`load_npy_exact`
parses a single ``.npy``: fixed magic and version, a bounded JSON index, little-endian
numeric dtypes only, and lengths that must add up to the last byte. Unpacking rebuilds the
ordinary ``ArrayRecord``, so codecs and validation see exactly what they would have seen
unpacked; a record that is not packed passes through unchanged (SecAgg's masked vector is
one array already).

Layout of the packed bytes (one ``uint8`` array under :data:`PACKED_KEY`)::

    b"FTPK" | version: u8 = 1 | 3 zero bytes | index length: u32 LE | index: UTF-8 JSON
    | each tensor's raw C-order bytes, in index order

where the index is ``[{"name": str, "dtype": "<f4", "shape": [int, ...]}, ...]``.
"""

from __future__ import annotations

import io
import json
import math
import struct
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from protocols.codecs import load_npy_exact
from protocols.errors import InvalidUpdate

PACKED_KEY: Final = "fedtune-packed"
MAGIC: Final = b"FTPK"
VERSION: Final = 1
_PREFIX = struct.Struct("<4sB3xI")
#: Dtypes a packed tensor may have: what our codecs put on the wire, little-endian only.
DTYPES: Final = frozenset({"<f4", "<f2", "<f8", "<i8", "<u8", "<i4", "<u4", "<u2", "|u1", "|i1"})
MAX_INDEX_BYTES: Final = 1 << 20
MAX_TENSORS: Final = 10_000
MAX_RANK: Final = 8


def is_packed(record: ArrayRecord) -> bool:
    return PACKED_KEY in record


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as a single ``uint8`` array (our own tensors: errors are bugs)."""
    index: list[dict[str, Any]] = []
    payloads: list[bytes] = []
    for name, array in record.items():
        value = np.ascontiguousarray(array.numpy())
        dtype = value.dtype.str
        if dtype not in DTYPES:
            raise ValueError(f"`{name}`: dtype {dtype} cannot be packed; allowed: "
                             f"{sorted(DTYPES)}")
        index.append({"name": name, "dtype": dtype, "shape": list(value.shape)})
        payloads.append(value.tobytes())
    header = json.dumps(index, separators=(",", ":")).encode()
    blob = b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, *payloads])
    return ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, dtype=np.uint8))})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The record :func:`pack_record` packed; an unpacked record is returned as it is.

    Raises :class:`InvalidUpdate` naming what is wrong with a malformed packed record.
    """
    if not is_packed(record):
        return record
    return ArrayRecord({name: _npy_array(dtype, shape, payload)
                        for name, dtype, shape, payload in _entries(record)})


def unpack_views(record: ArrayRecord) -> dict[str, npt.NDArray[Any]]:
    """A packed record's tensors as read-only numpy views of the message's bytes: no copy
    (the coordinator's fast path for fp32 uploads, which it only reads). Strict as
    :func:`unpack_record`."""
    return {name: np.frombuffer(payload, dtype=dtype).reshape(shape)
            for name, dtype, shape, payload in _entries(record)}


def _entries(record: ArrayRecord) -> list[tuple[str, np.dtype[Any], tuple[int, ...],
                                                  memoryview]]:
    """Each packed tensor's name, dtype, shape and bytes (a view), validated."""
    if len(record) != 1:
        others = sorted(k for k in record if k != PACKED_KEY)
        raise InvalidUpdate(f"a packed record holds only `{PACKED_KEY}`; it also has {others}")
    packed = load_npy_exact(PACKED_KEY, record[PACKED_KEY], copy=False)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise InvalidUpdate(f"`{PACKED_KEY}`: expected a 1-D uint8 array, got "
                            f"{packed.dtype}{list(packed.shape)}")
    blob = packed.data  # a memoryview of the message's bytes
    index, offset = _read_index(blob)
    entries = []
    for entry in index:
        name, dtype, shape = entry["name"], np.dtype(entry["dtype"]), tuple(entry["shape"])
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > len(blob):
            raise InvalidUpdate(f"`{PACKED_KEY}`: `{name}` ({dtype}{list(shape)}) needs "
                                f"{nbytes} bytes, {len(blob) - offset} remain")
        entries.append((name, dtype, shape, blob[offset:offset + nbytes]))
        offset += nbytes
    if offset != len(blob):
        raise InvalidUpdate(f"`{PACKED_KEY}`: {len(blob) - offset} bytes after the last tensor")
    return entries


def _npy_array(dtype: np.dtype[Any], shape: tuple[int, ...], payload: memoryview) -> Array:
    """A Flower ``Array`` of raw C-order bytes: the ``.npy`` header numpy would write, then
    the bytes (what ``Array(ndarray)`` makes through ``np.save``, without its copies)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return Array(dtype=str(dtype), shape=shape, stype="numpy.ndarray",
                 data=b"".join((header.getvalue(), payload)))


def _index_length(blob: memoryview) -> int:
    if len(blob) < _PREFIX.size:
        raise InvalidUpdate(f"`{PACKED_KEY}`: {len(blob)} bytes, shorter than its "
                            f"{_PREFIX.size}-byte prefix")
    magic, version, length = _PREFIX.unpack_from(blob)
    if magic != MAGIC or bytes(blob[5:8]) != b"\0\0\0":
        raise InvalidUpdate(f"`{PACKED_KEY}`: bad magic {bytes(blob[:8])!r}, expected {MAGIC!r} + "
                            "version + 3 zero bytes")
    if version != VERSION:
        raise InvalidUpdate(f"`{PACKED_KEY}`: format version {version}, this coordinator "
                            f"reads version {VERSION}")
    if length > MAX_INDEX_BYTES or _PREFIX.size + length > len(blob):
        raise InvalidUpdate(f"`{PACKED_KEY}`: index of {length} bytes does not fit "
                            f"(payload {len(blob)} bytes, limit {MAX_INDEX_BYTES})")
    return int(length)


def _read_index(blob: memoryview) -> tuple[list[dict[str, Any]], int]:
    """The validated index and the offset of the first tensor's bytes."""
    length = _index_length(blob)
    try:
        index = json.loads(bytes(blob[_PREFIX.size:_PREFIX.size + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidUpdate(f"`{PACKED_KEY}`: index is not UTF-8 JSON ({exc})") from None
    if not isinstance(index, list) or len(index) > MAX_TENSORS:
        raise InvalidUpdate(f"`{PACKED_KEY}`: index must be a list of at most {MAX_TENSORS} "
                            "entries")
    seen: set[str] = set()
    for position, entry in enumerate(index):
        where = f"`{PACKED_KEY}` index entry {position}"
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise InvalidUpdate(f"{where}: expected exactly name, dtype and shape")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not name or name == PACKED_KEY:
            raise InvalidUpdate(f"{where}: bad name {name!r}")
        if name in seen:
            raise InvalidUpdate(f"{where}: `{name}` appears twice")
        seen.add(name)
        if dtype not in DTYPES:
            raise InvalidUpdate(f"{where} (`{name}`): dtype {dtype!r} is not one of "
                                f"{sorted(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise InvalidUpdate(f"{where} (`{name}`): shape must be a list of at most "
                                f"{MAX_RANK} non-negative integers, got {shape!r}")
    return index, _PREFIX.size + length
