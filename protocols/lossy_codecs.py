"""Lossy update codecs: fewer bytes per uploaded delta, decoded strictly.

Peers ship 8- and 4-bit update filters for LLM fine-tuning (NVFlare's blockwise8 / fp4 /
nf4), and the seed papers show adapter deltas survive far lower precision (BitDelta: one
sign bit per weight plus a scale). The codecs here, by name:

========  ======================================================  ====================
name      on the wire (all tensors as one flat vector)            bits per coordinate
========  ======================================================  ====================
``fp16``  IEEE half floats                                        16
``bf16``  the upper 16 bits of each float32 (bfloat16)            16
``int8``  codes in [-127, 127], a bfloat16 scale per block        8.125 (blocks of 128)
``int4``  codes in [-7, 7] in 4 bits, a bfloat16 scale per block  4.125
``int3``  codes in [-3, 3] in 3 bits, a scale per block           3.125
``int2``  codes in {-1, 0, 1} in 2 bits, a scale per block        2.125
``sign1`` one sign bit, each block's mean magnitude               1.125
``topk``  the 1/32 largest magnitudes: uint32 index + fp16 value  1.5
========  ======================================================  ====================

The integer codecs round *stochastically* (``floor(x / s + u)``, u uniform), so each code
is an unbiased estimate of its coordinate; the draws come from the round's seed and the
device (:attr:`RoundContext.seed`), so a rerun sends the same bytes. ``sign1`` and ``topk``
are biased; like every lossy codec they are meant to run with the client's error feedback
(``client/error_feedback.py``), which carries what was lost into the next round's upload.

Layout. The sent tensors, in sorted key order, are concatenated into one flat vector, and
the record carries three kinds of array: ``#tensors`` (a bitmap over the sorted keys of the
round's global adapter: which tensors the vector holds — FFA-LoRA sends only the B's),
``#<codec>`` (the codes) and ``#<codec>-scale`` or ``#topk-index``. One vector instead of
one array per tensor matters at these sizes: the packed record's index names every array,
and for SmolLM2's 150 adapter tensors the names alone weighed 7 % of an int4 upload. Block
scales are bfloat16 rounded *up*, so codes never leave their range and half the bytes of
float32 scales buy the same rounding. Shapes come from the round's global adapter, which
both sides hold; decoding refuses a missing, extra or misshapen array, a wrong dtype,
non-finite or negative scales, codes out of range and unsorted or repeated indices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from protocols import bitpack
from protocols.adapter_spec import Tensors
from protocols.codecs import ClientUpdate, RoundContext, load_npy_exact
from protocols.errors import InvalidUpdate

BLOCK = 128
TOPK_DIVISOR = 32  # topk keeps ceil(n / 32) coordinates
TENSORS_KEY = "#tensors"
#: The float32 values from which bfloat16's round-to-nearest gives infinity.
BF16_MAX = float(np.array([0x7F7F8000], np.uint32).view(np.float32)[0])


def _array(values: npt.NDArray[Any]) -> Array:
    return Array(np.ascontiguousarray(values))


def bf16_up(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Non-negative float32 values rounded *up* to bfloat16 (its 16 bits): a scale that
    is never smaller than asked, so codes stay within their levels."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    up = (bits + 0xFFFF) >> 16
    if np.any(up >= 0x7F80):
        raise ValueError("a block scale exceeds bfloat16's range; the update is too large")
    return up.astype("<u2")


def bf16_to_f32(bits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _blocks(n: int) -> int:
    return max(1, math.ceil(n / BLOCK))


def _padded(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The flat vector padded with zeros to whole blocks, as (blocks, BLOCK)."""
    flat = np.zeros(_blocks(x.size) * BLOCK, np.float32)
    flat[:x.size] = x
    return flat.reshape(-1, BLOCK)


def _load(record: ArrayRecord, key: str, dtype: str, length: int) -> npt.NDArray[Any]:
    if key not in record:
        raise InvalidUpdate(f"`{key}`: missing")
    value = load_npy_exact(key, record[key])
    if value.dtype != np.dtype(dtype) or value.shape != (length,):
        raise InvalidUpdate(f"`{key}`: expected {np.dtype(dtype)}[{length}], got "
                            f"{value.dtype}{list(value.shape)}")
    return value


def _selected(record: ArrayRecord, ctx: RoundContext) -> list[str]:
    """The tensors the record's bitmap names, in the vector's (sorted) order."""
    keys = sorted(ctx.global_adapter)
    bitmap = _load(record, TENSORS_KEY, "|u1", math.ceil(len(keys) / 8))
    bits = np.unpackbits(bitmap, bitorder="little")
    if np.any(bits[len(keys):]):
        raise InvalidUpdate(f"`{TENSORS_KEY}`: names tensors beyond this round's adapter")
    chosen = [k for k, bit in zip(keys, bits[:len(keys)], strict=True) if bit]
    if not chosen:
        raise InvalidUpdate(f"`{TENSORS_KEY}`: names no tensor")
    return chosen


class _Codec:
    name = ""
    lossy = True

    def _keys(self) -> set[str]:
        """The record's keys besides :data:`TENSORS_KEY`."""
        return {f"#{self.name}"}

    def recognises(self, record: ArrayRecord) -> bool:
        return set(record.keys()) == {TENSORS_KEY, *self._keys()}

    def encode(self, update: ClientUpdate, ctx: RoundContext) -> ArrayRecord:
        keys = sorted(update.delta)
        unknown = [k for k in keys if k not in ctx.global_adapter]
        if unknown or not keys:
            raise ValueError(f"the update's tensors {unknown or keys} are not tensors of "
                             "this round's adapter")
        flat = np.concatenate([np.asarray(update.delta[k], np.float32).ravel() for k in keys])
        if not np.all(np.isfinite(flat)):  # no codec may turn NaN into a number
            bad = next(k for k in keys if not np.all(np.isfinite(update.delta[k])))
            raise ValueError(f"`{bad}`: the update has NaN or infinite values; refusing "
                             "to encode it")
        bitmap = np.packbits([k in update.delta for k in sorted(ctx.global_adapter)],
                             bitorder="little")
        rng = np.random.default_rng([ctx.seed, ctx.server_round, 0x1055])
        return ArrayRecord({TENSORS_KEY: _array(bitmap), **{
            key: _array(value) for key, value in self._encode(flat, rng).items()}})

    def decode(self, record: ArrayRecord, ctx: RoundContext) -> Tensors:
        if not self.recognises(record):
            raise InvalidUpdate(f"not a {self.name} upload: expected exactly the arrays "
                                f"{sorted({TENSORS_KEY, *self._keys()})}, got {sorted(record)}")
        keys = _selected(record, ctx)
        sizes = [int(np.prod(ctx.global_adapter[k].shape)) for k in keys]
        flat = self._decode(record, sum(sizes))
        if not np.all(np.isfinite(flat)):
            raise InvalidUpdate(f"`#{self.name}`: decodes to non-finite values")
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return {k: part.reshape(ctx.global_adapter[k].shape)
                for k, part in zip(keys, parts, strict=True)}

    def _encode(self, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
        raise NotImplementedError

    def _decode(self, record: ArrayRecord, n: int) -> npt.NDArray[np.float32]:
        raise NotImplementedError


class Fp16Codec(_Codec):
    name = "fp16"

    def _encode(self, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
        if np.any(np.abs(x) > np.finfo(np.float16).max):
            raise ValueError("the update exceeds float16's range; use bf16 or int8")
        return {"#fp16": x.astype("<f2")}

    def _decode(self, record: ArrayRecord, n: int) -> npt.NDArray[np.float32]:
        return _load(record, "#fp16", "<f2", n).astype(np.float32)


class Bf16Codec(_Codec):
    name = "bf16"

    def _encode(self, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
        if np.any(np.abs(x) >= BF16_MAX):  # would round to infinity
            raise ValueError("the update exceeds bfloat16's range")
        bits = x.astype("<f4").view(np.uint32).astype(np.uint64)
        # round to nearest, ties to even, on the 16 bits that are dropped
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return {"#bf16": rounded.astype("<u2")}

    def _decode(self, record: ArrayRecord, n: int) -> npt.NDArray[np.float32]:
        return bf16_to_f32(_load(record, "#bf16", "<u2", n))


class _Scaled(_Codec):
    @property
    def scale_key(self) -> str:
        return f"#{self.name}-scale"

    def _keys(self) -> set[str]:
        return {f"#{self.name}", self.scale_key}

    def _scales(self, record: ArrayRecord, n: int) -> npt.NDArray[np.float32]:
        scale = bf16_to_f32(_load(record, self.scale_key, "<u2", _blocks(n)))
        if not np.all(np.isfinite(scale)) or np.any(np.signbit(scale)):
            raise InvalidUpdate(f"`{self.scale_key}`: scales must be finite and >= 0")
        return scale

    @staticmethod
    def _per_value(scale: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
        """Each block's scale repeated for its values: the first ``n``."""
        return np.repeat(scale, BLOCK)[:n]


class BlockIntCodec(_Scaled):
    """Blockwise symmetric integers with stochastic rounding: ``bits`` 8, 4, 3 or 2."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1  # 127, 7, 3, 1
        self.name = f"int{bits}"

    def _encode(self, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
        blocks = _padded(x)
        scale_bits = bf16_up(np.abs(blocks).max(axis=1) / np.float32(self.levels))
        scale = bf16_to_f32(scale_bits)
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        scaled = blocks / safe  # in [-levels, levels]
        codes = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
        codes = np.clip(codes, -self.levels, self.levels).astype(np.int16).ravel()[:x.size]
        return {f"#{self.name}": bitpack.pack(codes + self.levels, self.bits),
                self.scale_key: scale_bits}

    def _decode(self, record: ArrayRecord, n: int) -> npt.NDArray[np.float32]:
        scale = self._scales(record, n)
        key = f"#{self.name}"
        if key not in record:
            raise InvalidUpdate(f"`{key}`: missing")
        stored = bitpack.unpack(load_npy_exact(key, record[key]), self.bits, n, what=key)
        if np.any(stored > 2 * self.levels):
            raise InvalidUpdate(f"`{key}`: codes outside [-{self.levels}, {self.levels}]")
        codes = stored.astype(np.int16) - self.levels
        out: npt.NDArray[np.float32] = (codes * self._per_value(scale, n)).astype(np.float32)
        return out


class SignCodec(_Scaled):
    """One bit per coordinate (its sign) and each block's mean magnitude."""

    name = "sign1"

    def _encode(self, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
        blocks = _padded(x)
        counts = np.full(blocks.shape[0], BLOCK, np.float32)
        counts[-1] = x.size - BLOCK * (blocks.shape[0] - 1) or BLOCK
        scale = bf16_up(np.abs(blocks).sum(axis=1) / counts)
        return {"#sign1": bitpack.pack((x >= 0).astype(np.uint8), 1), self.scale_key: scale}

    def _decode(self, record: ArrayRecord, n: int) -> npt.NDArray[np.float32]:
        scale = self._scales(record, n)
        if "#sign1" not in record:
            raise InvalidUpdate("`#sign1`: missing")
        bits = bitpack.unpack(load_npy_exact("#sign1", record["#sign1"]), 1, n, what="#sign1")
        signs = np.where(bits == 1, 1.0, -1.0).astype(np.float32)
        return (signs * self._per_value(scale, n)).astype(np.float32)


class TopKCodec(_Codec):
    """The ``ceil(n / 32)`` largest magnitudes, as sorted uint32 indices and fp16 values."""

    name = "topk"

    def _keys(self) -> set[str]:
        return {"#topk", "#topk-index"}

    @staticmethod
    def kept(n: int) -> int:
        return max(1, math.ceil(n / TOPK_DIVISOR))

    def _encode(self, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
        if x.size >= 2**32:
            raise ValueError("topk indexes at most 2**32 coordinates")
        k = self.kept(x.size)
        # stable order: ties broken by position, so a rerun picks the same coordinates
        index = np.sort(np.argsort(-np.abs(x), kind="stable")[:k]).astype("<u4")
        values = x[index]
        if np.any(np.abs(values) > np.finfo(np.float16).max):
            raise ValueError("the update exceeds float16's range; use int8")
        return {"#topk-index": index, "#topk": values.astype("<f2")}

    def _decode(self, record: ArrayRecord, n: int) -> npt.NDArray[np.float32]:
        k = self.kept(n)
        index = _load(record, "#topk-index", "<u4", k).astype(np.int64)
        if index[-1] >= n or np.any(np.diff(index) <= 0):
            raise InvalidUpdate(f"`#topk-index`: indices must be strictly increasing and "
                                f"below {n}")
        out = np.zeros(n, np.float32)
        out[index] = _load(record, "#topk", "<f2", k).astype(np.float32)
        return out


LOSSY_CODECS: Mapping[str, Any] = {
    "fp16": Fp16Codec, "bf16": Bf16Codec, "int8": lambda: BlockIntCodec(8),
    "int4": lambda: BlockIntCodec(4), "int3": lambda: BlockIntCodec(3),
    "int2": lambda: BlockIntCodec(2), "sign1": SignCodec,
    "topk": TopKCodec,
}
