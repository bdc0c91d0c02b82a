"""Update codecs: how adapter tensors become an ``ArrayRecord`` and back.

A codec is the seam for compression (fp16, int8, top-k) and for the seed/scalar uploads of
forward-only edge clients: the client encodes, the coordinator decodes, and both refer to the
codec by the name carried in the instruction's ConfigRecord. Decoding is strict because its
input is untrusted; :mod:`protocols.validation` then checks the decoded tensors against the
adapter spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

from protocols.adapter_spec import Tensors
from protocols.errors import InvalidUpdate


class UpdateCodec(Protocol):
    """Turns named float32 tensors into a wire record and back."""

    name: str

    def encode(self, tensors: Mapping[str, npt.NDArray[Any]]) -> ArrayRecord: ...

    def decode(self, record: ArrayRecord) -> Tensors: ...


class Fp32Codec:
    """Identity codec: every tensor as little-endian float32, exactly as trained."""

    name = "fp32"

    def encode(self, tensors: Mapping[str, npt.NDArray[Any]]) -> ArrayRecord:
        arrays = {}
        for key, value in tensors.items():
            arr = np.ascontiguousarray(value, dtype="<f4")
            arrays[key] = Array(arr)
        return ArrayRecord(arrays)

    def decode(self, record: ArrayRecord) -> Tensors:
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


def _seed_scalar() -> UpdateCodec:
    from protocols.seed_updates import SeedScalarCodec  # imports this module: load lazily

    return SeedScalarCodec()


def load_npy_exact(key: str, array: Array) -> npt.NDArray[Any]:
    """Parse one untrusted array payload: ``.npy`` only, no pickles, no trailing bytes, and
    the header exactly as numpy writes it.

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
        value = np.load(io.BytesIO(array.data), allow_pickle=False)
    except Exception as exc:  # np.load raises many types on corrupt bytes
        raise InvalidUpdate(f"`{key}`: payload is not a valid .npy array ({exc})") from None
    expected = header + value.nbytes
    if len(array.data) != expected or fortran or tuple(shape) != value.shape:
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


_CODECS: dict[str, Callable[[], UpdateCodec]] = {"fp32": Fp32Codec, "seed-scalar": _seed_scalar}


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
