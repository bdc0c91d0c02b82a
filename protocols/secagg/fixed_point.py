"""Fixed-point encoding: float tensors into integers mod ``2**k``, where masks live.

Secure aggregation (Bonawitz et al., CCS 2017, §3) adds one-time pad masks in the group
``Z_R`` with ``R = 2**k``; floats must first become integers. A coordinate ``x`` is clipped to
``[-clip, clip]``, scaled and rounded to the nearest integer ``q = rint(x · scale)``, then stored
as ``q mod 2**k`` (two's complement in ``uint32`` for ``k = 32`` or ``uint64`` for ``k = 64``, so
numpy's wrapping integer arithmetic *is* arithmetic mod ``2**k``). The sum of ``n`` encodings,
read back as a signed ``k``-bit integer, is the sum of the ``q``'s exactly as long as it cannot
wrap: :func:`check_headroom` demands ``n · ceil(clip · scale) < 2**(k-1)``.

Rounding is round-to-nearest, ties to even (``numpy.rint``) by default: deterministic, so a
client's encoding is reproducible and testable. Given a random generator, :func:`encode`
rounds *stochastically* instead (``floor(x · scale + u)``, ``u`` uniform): each integer is an
unbiased estimate, which matters when ``scale`` is so small that the grid is coarse — the
quantized uploads of a lossy codec inside secure aggregation, where a coordinate becomes one
of ``2L + 1`` levels (``L = 7`` for int4) and the sum of ``n`` of them needs only
``m = bit_length(n · L) + 1`` bits (:func:`quantized_modulus_bits`): the masked upload shrinks
from 32 bits per coordinate to ``m``.

Moduli: 32 and 64 (native words, wrap-around for free) and any ``m`` from 2 to 31, held in
``uint32`` and reduced with :func:`reduce_mod` after every addition (``2**m`` divides
``2**32``, so the reduction is exact).

Error bound: each coordinate of each client is off by at most ``0.5 / scale``, so a decoded sum
of ``n`` clients differs from the float64 sum of the *clipped* inputs by at most
``n · 0.5 / scale`` per coordinate (:func:`error_bound`), plus the float32 rounding of the result
(relative ``2**-24``). Clipping is not counted as error: it is the caller's bound on the input
(and the sensitivity a DP mechanism relies on).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

#: The moduli of the exact fixed-point path (``security.secagg_modulus_bits``): native words.
MODULUS_BITS = (32, 64)
#: Every modulus the maths supports: small ones for quantized uploads.
ALL_MODULUS_BITS = (*range(2, 33), 64)

#: The lossy integer codecs that can run inside secure aggregation, and their code levels:
#: a coordinate becomes an integer in [-levels, levels] on a grid shared by every client.
QUANTIZED_LEVELS = {"int8": 127, "int4": 7, "int3": 3, "int2": 1}

UIntArray = npt.NDArray[np.unsignedinteger[Any]]


def uint_dtype(modulus_bits: int) -> np.dtype[np.unsignedinteger[Any]]:
    """The unsigned dtype holding integers mod ``2**modulus_bits``: ``uint32`` up to 32 bits,
    ``uint64`` for 64."""
    if isinstance(modulus_bits, bool) or modulus_bits not in ALL_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be 2 to 32 or 64, got {modulus_bits!r}")
    return np.dtype(np.uint32) if modulus_bits <= 32 else np.dtype(np.uint64)


def reduce_mod(arr: UIntArray, modulus_bits: int) -> UIntArray:
    """``arr`` reduced mod ``2**modulus_bits`` in place (a no-op for native widths)."""
    if modulus_bits < 32:
        arr &= np.uint32((1 << modulus_bits) - 1)
    return arr


def quantized_modulus_bits(num_clients: int, levels: int) -> int:
    """The fewest bits whose signed reading holds a sum of ``num_clients`` codes in
    ``[-levels, levels]``: ``num_clients · levels < 2**(m-1)``, the log2(n) headroom bits
    above a code's own."""
    return max(2, (num_clients * levels).bit_length() + 1)


def quantized_scale(levels: int, clip: float) -> float:
    """The scale mapping ``[-clip, clip]`` onto ``[-levels, levels]``, nudged down until
    ``ceil(clip · scale) == levels`` holds in floating point (the headroom rule's bound)."""
    _check_positive("clip", clip)
    scale = levels / clip
    while math.ceil(clip * scale) > levels:
        scale = math.nextafter(scale, 0.0)
    return scale


def check_headroom(*, num_clients: int, clip: float, scale: float, modulus_bits: int) -> None:
    """Refuse parameters under which a sum of ``num_clients`` encodings could wrap around.

    Each encoded coordinate has magnitude at most ``ceil(clip · scale)``; the signed reading of
    a ``k``-bit sum is exact while ``num_clients · ceil(clip · scale) < 2**(k-1)``.
    """
    uint_dtype(modulus_bits)
    _check_positive("clip", clip)
    _check_positive("scale", scale)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    per_client = math.ceil(clip * scale)  # exact integer: no float rounding in the comparison
    limit = 1 << (modulus_bits - 1)
    if num_clients * per_client >= limit:
        raise ValueError(
            f"fixed-point sum can overflow: num_clients * clip * scale = {num_clients} * "
            f"{clip!r} * {scale!r} = {num_clients * per_client} (rounded up) is not below "
            f"2**{modulus_bits - 1} = {limit}; lower scale or clip, or use modulus_bits=64"
        )


def error_bound(*, num_clients: int, scale: float) -> float:
    """Worst-case quantisation error per coordinate of a decoded sum: ``n · 0.5 / scale``."""
    _check_positive("scale", scale)
    return num_clients * 0.5 / scale


def encode(
    x: npt.ArrayLike, *, scale: float, clip: float, modulus_bits: int, num_clients: int,
    rng: np.random.Generator | None = None,
) -> UIntArray:
    """Clip, scale, round and wrap ``x`` into integers mod ``2**modulus_bits``.

    ``num_clients`` is the most clients whose encodings will be summed (the round's sampled
    clients); it is needed only to refuse parameters that could overflow that sum. Rounds
    to nearest, or stochastically with ``rng``. Raises ``ValueError`` for NaN or infinite
    coordinates: a client must not upload them, and no integer represents them.
    """
    check_headroom(num_clients=num_clients, clip=clip, scale=scale, modulus_bits=modulus_bits)
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"x: expected a floating-point array, got dtype {arr.dtype}")
    wide = arr.astype(np.float64)
    if not np.isfinite(wide).all():
        bad = int(np.size(wide) - np.count_nonzero(np.isfinite(wide)))
        raise ValueError(f"x: {bad} coordinates are NaN or infinite; refusing to encode")
    scaled = np.clip(wide, -clip, clip) * scale
    bound = math.ceil(clip * scale)
    if rng is None:
        q = np.rint(scaled).astype(np.int64)
    else:  # floor(v + u) can reach bound + 1 only through float rounding: clip it back
        q = np.clip(np.floor(scaled + rng.random(scaled.shape)), -bound, bound).astype(np.int64)
    return wrap_integers(q, modulus_bits)


def wrap_integers(q: npt.NDArray[np.int64], modulus_bits: int) -> UIntArray:
    """Signed integers as residues mod ``2**modulus_bits`` (two's complement)."""
    uint_dtype(modulus_bits)
    # int64 -> uint64 reinterprets two's complement; masking to k bits is exact mod 2**k.
    wrapped = np.ascontiguousarray(q, dtype=np.int64).view(np.uint64)
    if modulus_bits <= 32:
        narrow = (wrapped & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        return reduce_mod(narrow, modulus_bits)
    return wrapped


def decode_sum(
    s: npt.NDArray[Any], *, scale: float, clip: float, modulus_bits: int, num_clients: int,
    noise_bound: int = 0,
) -> npt.NDArray[np.float32]:
    """Read a sum of ``num_clients`` encodings as signed integers and scale back to float32.

    Every coordinate of an honest sum lies within ``±num_clients · ceil(clip · scale)`` (plus
    ``noise_bound`` where the clients added integer noise); a value outside means the masks
    were not removed correctly (or a client encoded with other parameters, or the noise
    reached a tail the modulus was sized to make negligible), so this raises ``ValueError``
    instead of returning noise as an aggregate.
    """
    check_headroom(num_clients=num_clients, clip=clip, scale=scale, modulus_bits=modulus_bits)
    if isinstance(noise_bound, bool) or not isinstance(noise_bound, int) or noise_bound < 0:
        raise ValueError(f"noise_bound must be an int >= 0, got {noise_bound!r}")
    dtype = uint_dtype(modulus_bits)
    arr = np.asarray(s)
    if arr.dtype != dtype:
        raise TypeError(
            f"s: expected dtype {dtype} for modulus_bits={modulus_bits}, got {arr.dtype}"
        )
    signed: npt.NDArray[np.signedinteger[Any]]
    if modulus_bits < 32:  # two's complement in m bits: subtract 2**m where the top bit is set
        wide = arr.astype(np.int64)
        signed = wide - (((wide >> (modulus_bits - 1)) & 1) << modulus_bits)
    else:
        signed = arr.view(np.int32 if modulus_bits == 32 else np.int64)
    bound = num_clients * math.ceil(clip * scale) + noise_bound
    if bound >= 1 << (modulus_bits - 1):
        raise ValueError(f"the sum's bound {bound} does not fit {modulus_bits} signed bits")
    outside = int(np.count_nonzero((signed > bound) | (signed < -bound)))
    if outside:
        raise ValueError(
            f"decoded sum has {outside} of {signed.size} coordinates outside "
            f"±(num_clients * ceil(clip * scale) + noise_bound) = ±{bound}: the masks were not "
            f"removed correctly or a client encoded with different parameters"
        )
    return (signed.astype(np.float64) / scale).astype(np.float32)


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
