"""Lossy update codecs: fewer bytes per uploaded delta, decoded strictly.

Peers ship 8- and 4-bit update filters for LLM fine-tuning (NVFlare's blockwise8 / fp4 /
nf4), and the seed papers show adapter deltas survive far lower precision (BitDelta: one
sign bit per weight plus a scale). The codecs here, by name:

========  ====================================================  =====================
name      per tensor on the wire                                bits per coordinate
========  ====================================================  =====================
``fp16``  IEEE half floats                                      16
``bf16``  the upper 16 bits of each float32 (bfloat16)          16
``int8``  codes in [-127, 127], one float32 scale per block     8.25 (blocks of 128)
``int4``  codes in [-7, 7], two per byte, a scale per block     4.25
``sign1`` one sign bit, one scale (mean magnitude) per block    1.25
========  ====================================================  =====================

``int8`` and ``int4`` round *stochastically* (``floor(x / s + u)``, u uniform), so each code
is an unbiased estimate of its coordinate; the draws come from the round's seed and the
device (:attr:`RoundContext.seed`), so a rerun sends the same bytes. ``sign1`` is biased
(it sends the block's mean magnitude with each sign); like every lossy codec it is meant to
run with the client's error feedback (``client/error_feedback.py``), which carries what was
lost into the next round's upload.

Each tensor ``k`` travels as ``k`` (codes) plus, for the block codecs, ``k#<codec>-scale``
(float32 scales, one per block of the flattened tensor; the suffix names the codec, so a
record is recognised without guessing). Shapes come from the round's global adapter,
which both sides hold; decoding refuses a missing, extra or misshapen array, a wrong dtype,
non-finite or negative scales, and codes out of range, with the key named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from protocols.adapter_spec import Tensors
from protocols.codecs import ClientUpdate, RoundContext, load_npy_exact
from protocols.errors import InvalidUpdate

BLOCK = 128
#: The float32 values from which bfloat16's round-to-nearest gives infinity.
BF16_MAX = float(np.array([0x7F7F8000], np.uint32).view(np.float32)[0])


def _array(values: npt.NDArray[Any]) -> Array:
    return Array(np.ascontiguousarray(values))


def _expected_keys(record: ArrayRecord, ctx: RoundContext, suffix: str) -> dict[str, int]:
    """Tensor key -> element count, for the tensors the record carries; refuses keys that
    are not adapter tensors (or, with ``suffix``, their scales) and codes without scales."""
    tensors = [k for k in record if not (suffix and k.endswith(suffix))]
    scales = {k.removesuffix(suffix) for k in record if suffix and k.endswith(suffix)}
    unknown = sorted(k for k in tensors if k not in ctx.global_adapter)
    if unknown:
        raise InvalidUpdate(f"`{unknown[0]}`: not a tensor of this round's adapter")
    if suffix and scales != set(tensors):
        odd = sorted(scales ^ set(tensors))[0]
        raise InvalidUpdate(f"`{odd}`: every tensor needs its codes and its `{suffix}`")
    return {k: int(np.prod(ctx.global_adapter[k].shape)) for k in tensors}


def _load(record: ArrayRecord, key: str, dtype: str, length: int) -> npt.NDArray[Any]:
    value = load_npy_exact(key, record[key])
    if value.dtype != np.dtype(dtype) or value.shape != (length,):
        raise InvalidUpdate(f"`{key}`: expected {np.dtype(dtype)}[{length}], got "
                            f"{value.dtype}{list(value.shape)}")
    return value


def _blocks(n: int) -> int:
    return max(1, math.ceil(n / BLOCK))


def _per_value(scale: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    """Each block's scale repeated for its values: the first ``n``."""
    return np.repeat(scale, BLOCK)[:n]


def _padded(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The flat tensor padded with zeros to whole blocks, as (blocks, BLOCK)."""
    flat = np.zeros(_blocks(x.size) * BLOCK, np.float32)
    flat[:x.size] = x.ravel()
    return flat.reshape(-1, BLOCK)


class _Codec:
    name = ""
    lossy = True
    codes_dtype = ""  # numpy's name of the codes' dtype

    @property
    def suffix(self) -> str:
        """The scale arrays' key suffix; '' for codecs without scales."""
        return ""

    def recognises(self, record: ArrayRecord) -> bool:
        """Codes of this codec's dtype, and scales named for it (when it sends scales)."""
        keys = list(record.keys())
        scales = [k for k in keys if self.suffix and k.endswith(self.suffix)]
        codes = [k for k in keys if k not in scales]
        return bool(codes) and (bool(scales) or not self.suffix) and all(
            record[k].dtype == self.codes_dtype for k in codes)

    def encode(self, update: ClientUpdate, ctx: RoundContext) -> ArrayRecord:
        rng = np.random.default_rng([ctx.seed, ctx.server_round, 0x1055])
        out: dict[str, Array] = {}
        for key in sorted(update.delta):
            x = np.asarray(update.delta[key], np.float32)
            if not np.all(np.isfinite(x)):  # no codec may turn NaN into a number
                raise ValueError(f"`{key}`: the update has NaN or infinite values; refusing "
                                 "to encode it")
            out.update(self._encode(key, x, rng))
        return ArrayRecord(out)

    def decode(self, record: ArrayRecord, ctx: RoundContext) -> Tensors:
        counts = _expected_keys(record, ctx, self.suffix)
        out: Tensors = {}
        for key, n in counts.items():
            flat = self._decode(record, key, n)
            if not np.all(np.isfinite(flat)):
                raise InvalidUpdate(f"`{key}`: decodes to non-finite values")
            out[key] = flat.reshape(ctx.global_adapter[key].shape)
        return out

    def _encode(self, key: str, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, Array]:
        raise NotImplementedError

    def _decode(self, record: ArrayRecord, key: str, n: int) -> npt.NDArray[np.float32]:
        raise NotImplementedError


class Fp16Codec(_Codec):
    name = "fp16"
    codes_dtype = "float16"

    def _encode(self, key: str, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, Array]:
        if np.any(np.abs(x) > np.finfo(np.float16).max):
            raise ValueError(f"`{key}`: the update exceeds float16's range; use bf16 or int8")
        return {key: _array(x.ravel().astype("<f2"))}

    def _decode(self, record: ArrayRecord, key: str, n: int) -> npt.NDArray[np.float32]:
        return _load(record, key, "<f2", n).astype(np.float32)


class Bf16Codec(_Codec):
    name = "bf16"
    codes_dtype = "uint16"

    def _encode(self, key: str, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, Array]:
        if np.any(np.abs(x) >= BF16_MAX):  # would round to infinity
            raise ValueError(f"`{key}`: the update exceeds bfloat16's range")
        bits = x.ravel().astype("<f4").view(np.uint32).astype(np.uint64)
        # round to nearest, ties to even, on the 16 bits that are dropped
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return {key: _array(rounded.astype("<u2"))}

    def _decode(self, record: ArrayRecord, key: str, n: int) -> npt.NDArray[np.float32]:
        upper = _load(record, key, "<u2", n).astype(np.uint32) << 16
        return upper.view(np.float32)


class _Scaled(_Codec):
    @property
    def suffix(self) -> str:
        return f"#{self.name}-scale"

    def _scales(self, record: ArrayRecord, key: str, n: int) -> npt.NDArray[np.float32]:
        scale = _load(record, key + self.suffix, "<f4", _blocks(n))
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise InvalidUpdate(f"`{key}{self.suffix}`: scales must be finite and >= 0")
        return scale


class BlockIntCodec(_Scaled):
    """Blockwise symmetric integers with stochastic rounding: ``bits`` 8 or 4."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1  # 127 or 7
        self.name = f"int{bits}"
        self.codes_dtype = "int8" if bits == 8 else "uint8"

    def _encode(self, key: str, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, Array]:
        blocks = _padded(x)
        scale = (np.abs(blocks).max(axis=1) / self.levels).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        scaled = blocks / safe  # in [-levels, levels]
        codes = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
        codes = np.clip(codes, -self.levels, self.levels).astype(np.int8).ravel()[:x.size]
        if self.bits == 8:
            payload = codes
        else:  # two per byte, offset by 8: low nibble first
            nibbles = (codes + 8).astype(np.uint8)
            if nibbles.size % 2:
                nibbles = np.append(nibbles, np.uint8(8))
            payload = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
        return {key: _array(payload), key + self.suffix: _array(scale.astype("<f4"))}

    def _decode(self, record: ArrayRecord, key: str, n: int) -> npt.NDArray[np.float32]:
        scale = self._scales(record, key, n)
        if self.bits == 8:
            codes = _load(record, key, "|i1", n).astype(np.int16)
        else:
            packed = _load(record, key, "|u1", math.ceil(n / 2))
            both = np.stack([packed & 0x0F, packed >> 4], axis=1).ravel()[:n]
            codes = both.astype(np.int16) - 8
        if np.any(np.abs(codes) > self.levels):
            raise InvalidUpdate(f"`{key}`: codes outside [-{self.levels}, {self.levels}]")
        return (codes * _per_value(scale, n)).astype(np.float32)


class SignCodec(_Scaled):
    """One bit per coordinate (its sign) and each block's mean magnitude."""

    name = "sign1"
    codes_dtype = "uint8"

    def _encode(self, key: str, x: npt.NDArray[np.float32],
                rng: np.random.Generator) -> dict[str, Array]:
        blocks = _padded(x)
        counts = np.full(blocks.shape[0], BLOCK, np.float32)
        counts[-1] = x.size - BLOCK * (blocks.shape[0] - 1) or BLOCK
        scale = (np.abs(blocks).sum(axis=1) / counts).astype("<f4")
        bits = np.packbits(x.ravel() >= 0)
        return {key: _array(bits.astype(np.uint8)), key + self.suffix: _array(scale)}

    def _decode(self, record: ArrayRecord, key: str, n: int) -> npt.NDArray[np.float32]:
        scale = self._scales(record, key, n)
        bits = np.unpackbits(_load(record, key, "|u1", math.ceil(n / 8)))[:n]
        signs = np.where(bits == 1, 1.0, -1.0).astype(np.float32)
        return (signs * _per_value(scale, n)).astype(np.float32)


def int8_codec() -> BlockIntCodec:
    return BlockIntCodec(8)


def int4_codec() -> BlockIntCodec:
    return BlockIntCodec(4)


LOSSY_CODECS: Mapping[str, Any] = {"fp16": Fp16Codec, "bf16": Bf16Codec, "int8": int8_codec,
                                   "int4": int4_codec, "sign1": SignCodec}
