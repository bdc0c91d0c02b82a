"""Unsigned integers of any width from 1 to 32 bits, packed densely into bytes.

Why our own: numpy packs single bits (``packbits``) but not k-bit fields, and neither
Flower nor the codecs' peers ship a strict unpacker for untrusted input. Two users: the
lossy codecs (2- and 4-bit codes) and secure aggregation's small moduli (a masked vector of
``m``-bit integers mod ``2**m`` travels in ``ceil(n·m / 8)`` bytes, not ``4n``).

Layout: value ``i``'s bit ``j`` is bit ``i·bits + j`` of the stream, and stream bit ``p`` is
bit ``p % 8`` of byte ``p // 8`` (little-endian throughout); the unused high bits of the last
byte are zero, and :func:`unpack` refuses them otherwise, so every value list has exactly one
encoding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.errors import InvalidUpdate

MAX_BITS = 32
CHUNK = 1 << 16  # values per piece in the bit-matrix path (a multiple of 8)


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` values of ``bits`` bits."""
    _check_bits(bits)
    return math.ceil(count * bits / 8)


def pack(values: npt.NDArray[Any], bits: int) -> npt.NDArray[np.uint8]:
    """``values`` (non-negative, each below ``2**bits``) packed into bytes."""
    _check_bits(bits)
    flat = np.asarray(values).ravel()
    if flat.size and (not np.issubdtype(flat.dtype, np.integer) or flat.min() < 0
                      or int(flat.max()) >> bits):
        raise ValueError(f"values must be integers in [0, 2**{bits}); a bug in the encoder")
    if bits == 8:
        return flat.astype(np.uint8)
    wide = flat.astype(np.uint64)
    if 8 % bits == 0:  # whole fields per byte: shift and OR, no bit matrix
        per = 8 // bits
        padded = np.zeros(math.ceil(wide.size / per) * per, np.uint64)
        padded[:wide.size] = wide
        fields = padded.reshape(-1, per) << (np.arange(per, dtype=np.uint64) * np.uint64(bits))
        packed: npt.NDArray[np.uint8] = np.bitwise_or.reduce(fields, axis=1).astype(np.uint8)
        return packed
    # Widths that do not divide 8 go through a bit matrix, CHUNK values at a time (a multiple
    # of 8, so each chunk ends on a byte boundary): bounded scratch memory.
    shifts = np.arange(bits, dtype=np.uint64)
    parts = [np.packbits(((wide[i:i + CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8)
                         .ravel(), bitorder="little") for i in range(0, wide.size, CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack(data: npt.NDArray[Any], bits: int, count: int, *, what: str) -> npt.NDArray[np.uint32]:
    """``count`` values of ``bits`` bits from untrusted bytes; :class:`InvalidUpdate` naming
    ``what`` when the length is wrong or the padding bits are not zero."""
    _check_bits(bits)
    raw = np.asarray(data)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != packed_size(count, bits):
        raise InvalidUpdate(f"`{what}`: expected uint8[{packed_size(count, bits)}] "
                            f"({count} values of {bits} bits), got {raw.dtype}{list(raw.shape)}")
    if bits == 8:
        return raw.astype(np.uint32)
    used = count * bits
    if used % 8 and int(raw[-1]) >> (used % 8):
        raise InvalidUpdate(f"`{what}`: the padding bits after the last value are not zero")
    if 8 % bits == 0:
        per = 8 // bits
        shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
        fields = (raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)
        values: npt.NDArray[np.uint32] = fields.ravel()[:count].astype(np.uint32)
        return values
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    out = np.empty(count, np.uint32)
    for i in range(0, count, CHUNK):  # CHUNK values are CHUNK * bits / 8 whole bytes
        n = min(CHUNK, count - i)
        chunk = raw[i * bits // 8: (i * bits + n * bits + 7) // 8]
        stream = np.unpackbits(chunk, bitorder="little")[:n * bits].reshape(n, bits)
        out[i:i + n] = (stream.astype(np.uint64) @ weights).astype(np.uint32)
    return out


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
