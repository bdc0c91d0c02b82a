"""Update codecs: how a client's update becomes an ``ArrayRecord`` and back.

Every upload is a **delta**: the client's trainable tensors minus the round's global adapter
(the plaintext, secure-aggregation and DP paths alike), so a codec never needs to know the
global adapter to be lossless, a lossy codec compresses the small numbers that matter, and
clipping for DP acts on what was sent.

A codec is the seam for compression (fp16, int8, top-k) and for the seed/scalar uploads of
forward-only edge clients: the client encodes, the coordinator decodes, both with the
round's :class:`RoundContext` (what both sides know of the round: the global adapter, the
spec, the round number, the step size and bounds the coordinator sent), and both refer to
the codec by the name carried in the instruction's ConfigRecord. Decoding is strict because
its input is untrusted; :mod:`protocols.validation` then checks the decoded delta against
the adapter spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from protocols.adapter_spec import AdapterSpec, Tensors, TensorsView
from protocols.errors import InvalidUpdate

if TYPE_CHECKING:
    from protocols.seed_updates import SeedUpdate


@dataclass(frozen=True)
class RoundContext:
    """What both sides know about the round an update belongs to.

    The client builds it from the instruction it received, the coordinator from the
    instruction it sent; a codec that needs more of the round (a seed replay needs the step
    size and bounds) finds it here instead of in special cases at its call sites.
    """

    global_adapter: TensorsView
    server_round: int = 0
    spec: AdapterSpec | None = None  # the coordinator's; a client does not need it
    learning_rate: float = 0.0  # the step size the coordinator sent (seed replay)
    max_steps: int = 0  # the step count the coordinator sent (seed replay)
    max_abs_scalar: float = 1e3  # the coordinator's bound on one projected gradient
    subspace: str = "full"  # where forward-only steps move (seed replay, edge.subspace)
    #: The coordinator's last step of the global adapter (trainable tensors; the
    #: 'trajectory' subspace's anchor), None when the round's subspace needs none.
    last_step: TensorsView | None = None
    seed: int = 0  # the device's draws for stochastic rounding (the round's seed + device)


@dataclass(frozen=True)
class ClientUpdate:
    """What a client has to send: its delta from the round's global adapter (trainable
    tensors only), and, from a forward-only trainer, the seed/scalar steps behind it."""

    delta: Tensors
    seed_update: SeedUpdate | None = field(default=None)


class UpdateCodec(Protocol):
    """Turns a client's update into a wire record and back, within one round."""

    name: str
    lossy: bool  # decode(encode(u)) != u: the client keeps the difference (error feedback)

    def encode(self, update: ClientUpdate, ctx: RoundContext) -> ArrayRecord: ...

    def decode(self, record: ArrayRecord, ctx: RoundContext) -> Tensors:
        """The delta the record carries; :class:`InvalidUpdate` on any defect."""
        ...

    def recognises(self, record: ArrayRecord) -> bool:
        """Whether ``record`` is in this codec's wire form (a round may allow several
        codecs, one per client kind; the coordinator picks the one that recognises it)."""
        ...


def to_record(tensors: Mapping[str, npt.NDArray[Any]]) -> ArrayRecord:
    """Tensors as an ``ArrayRecord`` of little-endian float32 arrays (the global adapter
    sent down, a dense delta sent up)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value, dtype="<f4"))
                        for key, value in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    """Strictly parse a record of float32 arrays (untrusted input)."""
    out: Tensors = {}
    for key, array in record.items():
        value = load_npy_exact(key, array)
        if value.dtype != np.dtype("<f4"):
            raise InvalidUpdate(f"`{key}`: expected dtype float32, got {value.dtype}")
        if tuple(value.shape) != tuple(array.shape):
            raise InvalidUpdate(
                f"`{key}`: header says shape {tuple(array.shape)}, "
                f"payload has shape {tuple(value.shape)}"
            )
        out[key] = value
    return out


class Fp32Codec:
    """Identity codec: the delta as little-endian float32, exactly as computed."""

    name = "fp32"
    lossy = False

    def encode(self, update: ClientUpdate, ctx: RoundContext) -> ArrayRecord:
        return to_record(update.delta)

    def decode(self, record: ArrayRecord, ctx: RoundContext) -> Tensors:
        return from_record(record)

    def recognises(self, record: ArrayRecord) -> bool:
        """Tensor names only: no other codec's wire keys (the lossy codecs' start with
        ``#``; the seed codec has its own), so a round allowing several tells them apart."""
        from protocols.seed_updates import WIRE_KEYS

        return not set(record.keys()) & WIRE_KEYS and not any(
            k.startswith("#") for k in record)


def is_fp32_upload(tensors: Mapping[str, npt.NDArray[Any]]) -> bool:
    """Whether unpacked tensors are an fp32 upload as :class:`Fp32Codec` reads it: every
    array little-endian float32, no other codec's wire keys (theirs start with ``#``, or
    are the seed codec's)."""
    from protocols.seed_updates import WIRE_KEYS

    return bool(tensors) and all(
        v.dtype == np.dtype("<f4") and not k.startswith("#") and k not in WIRE_KEYS
        for k, v in tensors.items())


def apply_delta(global_adapter: TensorsView, delta: Mapping[str, npt.NDArray[Any]]) -> Tensors:
    """The new global adapter: ``global + delta`` on the delta's keys (summed in float64,
    stored as float32); every other tensor (FFA-LoRA's frozen A) stays as it is."""
    out = dict(global_adapter)
    for key, value in delta.items():
        out[key] = (global_adapter[key].astype(np.float64) + value).astype(np.float32)
    return out


def decode_upload(record: ArrayRecord, ctx: RoundContext, allowed: Sequence[str]) -> Tensors:
    """The delta an untrusted upload carries, decoded by whichever of the round's ``allowed``
    codecs recognises it; :class:`InvalidUpdate` if none does."""
    for name in allowed:
        codec = get_codec(name)
        if codec.recognises(record):
            return codec.decode(record, ctx)
    raise InvalidUpdate(f"the upload is in none of this round's codecs {list(allowed)}")


def _seed_scalar() -> UpdateCodec:
    from protocols.seed_updates import SeedScalarCodec  # imports this module: load lazily

    return SeedScalarCodec()


def load_npy_exact(key: str, array: Array, *, copy: bool = True) -> npt.NDArray[Any]:
    """Parse one untrusted array payload: ``.npy`` only, no pickles, no trailing bytes, and
    the header exactly as numpy writes it. ``copy=False`` returns a read-only view of the
    message's bytes (for a caller that only reads them).

    ``np.load`` ignores bytes after the array, so a payload could carry extra data (or be
    padded to any size) unnoticed; the exact length is required instead. Its header parser
    also accepts any Python literal, comments included, so the header's padding could
    carry anything; it must be the canonical header instead (what ``np.save`` and Flower's
    ``Array`` write).
    """
    import io

    if array.stype != "numpy.ndarray":
        raise InvalidUpdate(f"`{key}`: expected serialisation 'numpy.ndarray', got {array.stype!r}")
    buffer = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            read_header = np.lib.format.read_array_header_1_0
        elif version == (2, 0):
            read_header = np.lib.format.read_array_header_2_0
        else:
            raise ValueError(f".npy format version {version} is not accepted")
        shape, fortran, dtype = read_header(buffer, max_header_size=10_000)
        header = buffer.tell()
        if dtype.hasobject:
            raise ValueError("object arrays (pickles) are not accepted")
        count = math.prod(shape)
        expected = header + count * dtype.itemsize
        if len(array.data) == expected and not fortran:
            # One memcpy out of the message's bytes (np.load reads in 256 KiB pieces).
            value = np.frombuffer(array.data, dtype=dtype, count=count,
                                  offset=header).reshape(shape)
            if copy:
                value = value.copy()
    except Exception as exc:  # the header parsers raise many types on corrupt bytes
        raise InvalidUpdate(f"`{key}`: payload is not a valid .npy array ({exc})") from None
    if len(array.data) != expected or fortran:
        raise InvalidUpdate(
            f"`{key}`: payload is {len(array.data)} bytes, a {dtype}{list(shape)} array "
            f"needs exactly {expected}"
        )
    canonical = io.BytesIO()
    write_header = (np.lib.format.write_array_header_1_0 if version == (1, 0)
                    else np.lib.format.write_array_header_2_0)
    write_header(canonical, {"descr": np.lib.format.dtype_to_descr(value.dtype),
                             "fortran_order": False, "shape": value.shape})
    if canonical.getvalue() != array.data[:header]:
        raise InvalidUpdate(f"`{key}`: .npy header is not the one numpy writes for a "
                            f"{dtype}{list(shape)} array")
    if tuple(array.shape) != value.shape or array.dtype != str(value.dtype):
        raise InvalidUpdate(
            f"`{key}`: header says shape {tuple(array.shape)} dtype {array.dtype}, payload has "
            f"shape {value.shape} dtype {value.dtype}"
        )
    return np.asarray(value)


def _lossy(name: str) -> Callable[[], UpdateCodec]:
    def factory() -> UpdateCodec:
        from protocols.lossy_codecs import LOSSY_CODECS  # imports this module: load lazily

        codec: UpdateCodec = LOSSY_CODECS[name]()
        return codec
    return factory


_CODECS: dict[str, Callable[[], UpdateCodec]] = {
    "fp32": Fp32Codec, "seed-scalar": _seed_scalar,
    **{name: _lossy(name)
       for name in ("fp16", "bf16", "int8", "int4", "int3", "int2", "sign1", "topk")},
}


def get_codec(name: str) -> UpdateCodec:
    """Return the codec registered under ``name``; unknown names list the valid ones."""
    try:
        return _CODECS[name]()
    except KeyError:
        valid = ", ".join(sorted(_CODECS))
        raise ValueError(f"unknown update codec {name!r}; valid codecs: {valid}") from None


def codec_names() -> list[str]:
    """Every registered codec's name, sorted (the config lists them as the valid choices)."""
    return sorted(_CODECS)


def register_codec(name: str, factory: Callable[[], UpdateCodec]) -> None:
    """Add a codec; refuses to replace one silently."""
    if name in _CODECS:
        raise ValueError(f"update codec {name!r} is already registered")
    _CODECS[name] = factory


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of a record as it travels (serialised arrays, excluding framing)."""
    return sum(len(array.data) for array in record.values())
