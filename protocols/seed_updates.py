"""Seed/scalar updates of forward-only (MeZO) edge clients, replayed exactly by the coordinator.

A MeZO step (Malladi et al., NeurIPS 2023, "Fine-Tuning Language Models with Just Forward
Passes", Alg. 1) moves the trainable adapter tensors θ along a random direction ``z``::

    g = (L(θ + εz) − L(θ − εz)) / (2ε)        θ ← θ − lr·g·z

``z`` is a pure function of a seed, so a round of ``n`` steps is fully described by the
global adapter it started from and ``n`` pairs ``(seed, g)`` (FedKSeed, Qin et al., ICML 2024):
12 bytes a step instead of the dense adapter. The coordinator regenerates each ``z`` and
replays the steps in order with the same float32 arithmetic as the client, so it obtains the
client's adapter *bit for bit* and aggregates it like any other update.

The direction ``z`` (format 1)
------------------------------
Bit-exact regeneration in another process, on another platform, with another numpy version
is the requirement, so ``z`` uses no floating-point library function at all:

* key   = SHA-256(``b"fedtune/mezo-z/v1\\x00"`` ‖ seed as 8 little-endian bytes); the seed
  is an integer in [0, 2**64);
* bits  = the ChaCha20 keystream (RFC 8439, via ``cryptography``) under that key, nonce and
  counter zero, read bit by bit, least significant bit of each byte first;
* z     = +1.0 where the bit is 0, −1.0 where it is 1 (float32), filling the **trainable**
  tensors one after another in **sorted key order**, each in C (row-major) order.

So ``z`` is Rademacher, not Gaussian: SPSA's classic perturbation (Spall 1992), which has
E[zzᵀ] = I like the Gaussian (the two-point estimate is unbiased to O(ε²) either way) and a
lower-variance estimate (Sadegh & Spall 1998). A Gaussian needs ``log``/``cos`` (or numpy's
ziggurat tables and tail ``exp``), whose float rounding may differ between libm builds and
SIMD paths, and numpy only promises stable *bit generator* streams, not stable
``Generator.standard_normal`` output across versions. Here we rely only on RFC 8439, SHA-256
and IEEE-754 float32 multiplication and subtraction, which are correctly rounded everywhere.

The update rule is ``θ ← θ − c·z`` with ``c = float32(float32(lr) · float32(g))``, evaluated
elementwise in float32 (:func:`sgd_step`; with z = ±1 the product ``c·z`` is exact, so each
element takes one rounding). Frozen tensors (FFA-LoRA's A) are never perturbed nor changed.

Wire form (Flower-free, three arrays)
-------------------------------------
``mezo-seeds`` uint64 (n,), ``mezo-scalars`` float32 (n,), ``mezo-header`` int64
``[format, base_round, layout]``; ``layout`` fingerprints the sorted trainable keys and
shapes, so a client whose ``[lora]`` settings differ from the coordinator's is rejected
with a reason instead of being replayed into garbage. The learning rate is the coordinator's
own (it sent it in the instruction): a client cannot choose its step size.

Subspaces (``edge.subspace``)
----------------------------
``full`` is the direction above, over every trainable coordinate. Zeroth-order estimates
get worse with the number of coordinates a step perturbs (the projected gradient's variance
grows with it; Malladi et al., §4), and over FFA-LoRA's 829,440 B coordinates twelve steps
barely move the adapter. ``components`` perturbs a subspace of about a thousand dimensions
instead (150 B tensors × rank 8 by default), spanned by the round's global adapter itself:
one sign per *component* (index along a tensor's last axis; a LoRA B column is one rank-one
component) scales that component of the global adapter ``θ₀``::

    u = the format-1 Rademacher signs over shapes {key: (shape[-1],)}
    z[key] = θ₀[key] · u[key]          (broadcast over the last axis; exact, u = ±1)

so a step rescales each rank-one component the backprop devices have learned (how far to go
along what they found, measured on the edge device's own data); θ₀ is the global adapter the
round started from, which the coordinator holds, so the replay regenerates ``z`` bit for bit.
Where θ₀ is zero (LoRA's B before round 1) ``z`` is zero and the step moves nothing. The
subspace is part of the ``layout`` fingerprint: a device and a coordinator that disagree on
it are refused, never replayed into garbage.

``trajectory`` is one dimension: the coordinator's last step of the global adapter,
``Δ = θ_r − θ_(r−1)``, the change between the last two adapters the coordinator sent that
differ (sent with the instruction as its own record; zero in a run's first round and the
first after a resume), with the seed's one Rademacher sign::

    u = the format-1 Rademacher sign of shape (1,)
    z[key] = Δ[key] · u                    (exact, u = ±1)

so MeZO becomes a one-dimensional search of how far to go on along the federation's last
step, measured on the edge device's own data: further where the step helped there, back
where it hurt (one backprop device's noisy update). A one-dimensional two-point estimate
has none of the variance that grows with the number of coordinates. The coordinator holds
``Δ`` (it made both adapters), so the replay regenerates ``z`` bit for bit.

Dense alternative: the forward-only trainer also returns its final θ, whose delta from the
global adapter travels through the ordinary ``fp32`` codec like a backprop client's
(:mod:`protocols.codecs`).

Seed grinding: a malicious client may search seeds for a direction that suits it; the
scalar bound (``max_abs_scalar``), the step bound (``max_steps``) and duplicate refusal cap
how far one reply can move θ (at most ``max_steps · lr · max_abs_scalar`` per coordinate).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import Array, ArrayRecord

from protocols import keys
from protocols.adapter_spec import AdapterSpec, Tensors, TensorsView
from protocols.codecs import ClientUpdate, RoundContext, load_npy_exact, register_codec
from protocols.errors import InvalidUpdate

#: Version of the direction and wire format above; a change to either bumps it.
FORMAT_VERSION: Final = 1
#: Name in the codec registry and in the instruction's ``codec`` entry.
SEED_CODEC_NAME: Final = "seed-scalar"
# ArrayRecord keys of the wire form.
SEEDS_KEY: Final = keys.SEEDS
SCALARS_KEY: Final = keys.SCALARS
HEADER_KEY: Final = keys.SEED_HEADER
WIRE_KEYS: Final = frozenset({SEEDS_KEY, SCALARS_KEY, HEADER_KEY})

_DOMAIN: Final = b"fedtune/mezo-z/v1\x00"
_ZERO_NONCE: Final = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter 0, nonce 0
_SEED_LIMIT: Final = 1 << 64
_WIRE_DTYPES: Final = {
    SEEDS_KEY: np.dtype("<u8"),
    SCALARS_KEY: np.dtype("<f4"),
    HEADER_KEY: np.dtype("<i8"),
}

Shapes = Mapping[str, tuple[int, ...]]
#: The directions a forward-only step may take (module docstring, "Subspaces").
SUBSPACES: Final = ("full", "components", "trajectory")
#: The subspaces whose directions are built from an anchor tensor set (``direction``).
ANCHORED: Final = ("components", "trajectory")
#: One MeZO step: its seed and its projected gradient ``g`` (cast to float32 when used).
Pair = tuple[int, float | np.float32]


# --- the direction -------------------------------------------------------------------------


def perturbation(seed: int, shapes: Shapes) -> Tensors:
    """The Rademacher direction ``z`` of ``seed`` over ``shapes`` (format 1, module docstring).

    ``shapes`` must be the *trainable* tensors only (``spec.trainable_keys``): adding or
    removing a key shifts every later tensor's bits.
    """
    key = _seed_key(seed)
    layout = sorted(shapes.items())
    sizes = [math.prod(shape) for _, shape in layout]
    total = sum(sizes)
    stream = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(-(-total // 8))), dtype=np.uint8)
    bits = np.unpackbits(raw, bitorder="little")[:total]
    flat = np.where(bits == 0, np.float32(1.0), np.float32(-1.0))  # (total,) float32
    out: Tensors = {}
    offset = 0
    for (name, shape), size in zip(layout, sizes, strict=True):
        out[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return out


def direction(
    seed: int, shapes: Shapes, *, subspace: str = "full", anchor: TensorsView | None = None,
) -> Tensors:
    """The step direction ``z`` of ``seed`` in ``subspace`` (module docstring, "Subspaces").

    ``full``: :func:`perturbation`. ``components``: the global adapter ``anchor`` (the
    round's θ₀, float32, the trainable tensors at least) with each component's sign flipped
    by the seed's Rademacher draw. ``trajectory``: the coordinator's last step ``anchor``
    with one sign. The products are exact, so client and replay agree.
    """
    if subspace == "full":
        return perturbation(seed, shapes)
    if subspace not in ANCHORED:
        raise ValueError(f"subspace must be one of {list(SUBSPACES)}, got {subspace!r}")
    if anchor is None:
        what = ("the round's global adapter" if subspace == "components"
                else "the coordinator's last step of the global adapter")
        raise ValueError(f"the {subspace!r} subspace needs {what} (anchor)")
    if subspace == "trajectory":
        sign = perturbation(seed, {"sign": (1,)})["sign"]
        return {key: np.multiply(anchor[key], sign, dtype=np.float32) for key in shapes}
    signs = perturbation(seed, {key: shape[-1:] for key, shape in shapes.items()})
    return {key: np.multiply(anchor[key], signs[key], dtype=np.float32) for key in shapes}


def check_last_step(last_step: TensorsView | None, shapes: Shapes) -> TensorsView:
    """``last_step`` itself, once it is known to hold a float32 tensor of each shape (the
    ``trajectory`` subspace's anchor; extra tensors are ignored); ``ValueError`` if not."""
    if last_step is None:
        raise ValueError("the 'trajectory' subspace needs the coordinator's last step of the "
                         "global adapter")
    for key, shape in shapes.items():
        value = last_step.get(key)
        if value is None or tuple(value.shape) != shape or value.dtype != np.float32:
            got = "nothing" if value is None else f"{value.dtype} {tuple(value.shape)}"
            raise ValueError(f"last step `{key}`: expected float32 {shape}, got {got} (do "
                             "this device's [lora] settings differ from the coordinator's?)")
    return last_step


def trainable_shapes(spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors ``z`` covers: the spec's trainable ones (FFA-LoRA: only B)."""
    return {k: spec.tensors[k].shape for k in spec.trainable_keys}


def layout_id(shapes: Shapes, subspace: str = "full") -> int:
    """63-bit fingerprint of the format, the subspace, the trainable keys and their shapes
    (``full`` hashes as it did before subspaces existed, so its fingerprints are unchanged)."""
    layout = sorted((k, list(s)) for k, s in shapes.items())
    text = json.dumps([FORMAT_VERSION, layout] if subspace == "full"
                      else [FORMAT_VERSION, subspace, layout])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_key(seed: int) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return hashlib.sha256(_DOMAIN + int(seed).to_bytes(8, "little")).digest()


# --- the step ------------------------------------------------------------------------------


def step_coefficient(learning_rate: float, scalar: float | np.float32) -> np.float32:
    """``float32(float32(lr) · float32(g))``: the one rounding both sides must share."""
    return np.float32(np.float32(learning_rate) * np.float32(scalar))


def sgd_step(
    theta: MutableMapping[str, npt.NDArray[np.float32]], z: TensorsView,
    coefficient: np.float32,
) -> None:
    """``θ ← θ − c·z`` in place, float32, for every tensor of ``z``.

    The client's trainer and :func:`apply_seed_updates` both call this, so their results are
    the same bits by construction.
    """
    for key, direction in z.items():
        np.subtract(theta[key], coefficient * direction, out=theta[key])


def apply_seed_updates(
    global_adapter: Mapping[str, npt.NDArray[Any]],
    pairs: Iterable[Pair],
    *,
    spec: AdapterSpec,
    learning_rate: float,
    subspace: str = "full",
    last_step: TensorsView | None = None,
) -> Tensors:
    """Replay MeZO steps ``(seed, g)`` in order from ``global_adapter``; returns a new adapter.
    Each step's direction is :func:`direction` in ``subspace``, anchored at
    ``global_adapter`` (``components``) or at ``last_step`` (``trajectory``).

    Every tensor of ``global_adapter`` is in the result (copied); only the spec's trainable
    ones change. Raises ``ValueError`` if ``global_adapter`` (or, in ``trajectory``,
    ``last_step``) does not match ``spec``: the caller's own state is wrong, not the client's.
    """
    shapes = trainable_shapes(spec)
    for key, shape in shapes.items():
        if key not in global_adapter:
            raise ValueError(f"global adapter lacks trainable tensor `{key}`")
        value = global_adapter[key]
        if tuple(value.shape) != shape or value.dtype != np.float32:
            raise ValueError(
                f"`{key}`: expected float32 {shape}, got {value.dtype} {tuple(value.shape)}"
            )
    theta: Tensors = {k: np.array(v, dtype=np.float32, copy=True) for k, v in
                      global_adapter.items()}
    anchor = (check_last_step(last_step, shapes) if subspace == "trajectory"
              else global_adapter)
    for seed, scalar in pairs:
        z = direction(seed, shapes, subspace=subspace, anchor=anchor)
        sgd_step(theta, z, step_coefficient(learning_rate, scalar))
    return theta


# --- the update and its validation --------------------------------------------------------


@dataclass(frozen=True)
class SeedUpdate:
    """What a forward-only client uploads: its starting round and its ``(seed, g)`` steps.

    Parameters
    ----------
    base_round
        The server round whose global adapter the steps start from.
    seeds
        uint64 ``(n,)``: one seed per step, in step order.
    scalars
        float32 ``(n,)``: the projected gradient ``g`` of each step.
    layout
        :func:`layout_id` of the client's trainable tensors.
    """

    base_round: int
    seeds: npt.NDArray[np.uint64]
    scalars: npt.NDArray[np.float32]
    layout: int

    def __post_init__(self) -> None:
        for name, want in (("seeds", np.uint64), ("scalars", np.float32)):
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.dtype != want:
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise TypeError(f"{name}: expected a {np.dtype(want)} array, got {got}")
            if value.ndim != 1:
                raise ValueError(f"{name}: expected a 1-D array, got shape {value.shape}")

    def pairs(self) -> list[Pair]:
        """The steps as ``(seed, g)`` in order (raises if the lengths differ)."""
        return [(int(s), g) for s, g in zip(self.seeds, self.scalars, strict=True)]

    def to_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The Flower-free wire form: three little-endian arrays (module docstring)."""
        return {
            SEEDS_KEY: np.ascontiguousarray(self.seeds, dtype="<u8"),
            SCALARS_KEY: np.ascontiguousarray(self.scalars, dtype="<f4"),
            HEADER_KEY: np.array([FORMAT_VERSION, self.base_round, self.layout], dtype="<i8"),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.NDArray[Any]]) -> SeedUpdate:
        """Parse the wire form strictly; :class:`InvalidUpdate` names what is wrong."""
        missing = sorted(_WIRE_DTYPES.keys() - arrays.keys())
        unexpected = sorted(arrays.keys() - _WIRE_DTYPES.keys())
        if missing or unexpected:
            raise InvalidUpdate(
                f"seed update: missing arrays {missing}, unexpected arrays {unexpected}"
            )
        for key, want in _WIRE_DTYPES.items():
            value = arrays[key]
            if value.dtype != want:
                raise InvalidUpdate(f"`{key}`: expected dtype {want}, got {value.dtype}")
            if value.ndim != 1:
                raise InvalidUpdate(f"`{key}`: expected a 1-D array, got shape {value.shape}")
        header = arrays[HEADER_KEY]
        if len(header) != 3:
            raise InvalidUpdate(f"`{HEADER_KEY}`: expected 3 entries, got {len(header)}")
        version, base_round, layout = (int(v) for v in header)
        if version != FORMAT_VERSION:
            raise InvalidUpdate(
                f"`{HEADER_KEY}`: format {version} is not the supported {FORMAT_VERSION}"
            )
        return cls(
            base_round=base_round,
            seeds=arrays[SEEDS_KEY].astype(np.uint64),
            scalars=arrays[SCALARS_KEY].astype(np.float32),
            layout=layout,
        )


def validate_seed_update(
    update: SeedUpdate,
    *,
    expected_round: int,
    expected_layout: int,
    max_steps: int,
    max_abs_scalar: float,
) -> None:
    """Raise :class:`InvalidUpdate` unless ``update`` may be replayed this round.

    ``max_steps`` is the local step count the coordinator asked for; ``max_abs_scalar``
    bounds ``|g|`` (an honest client clips to it), so together they bound how far one
    reply moves each coordinate. Both are required: there is no safe default for them.
    """
    if update.base_round != expected_round:
        age = "stale" if update.base_round < expected_round else "future"
        raise InvalidUpdate(
            f"seed update: {age} base round {update.base_round}, expected round {expected_round}"
        )
    if update.layout != expected_layout:
        raise InvalidUpdate(
            "seed update: trainable-tensor layout differs from the coordinator's "
            "(different [lora] settings, adapter keys or edge.subspace)"
        )
    n_seeds, n_scalars = len(update.seeds), len(update.scalars)
    if n_seeds != n_scalars:
        raise InvalidUpdate(f"seed update: {n_seeds} seeds but {n_scalars} scalars")
    if n_seeds == 0:
        raise InvalidUpdate("seed update: no steps (zero pairs)")
    if n_seeds > max_steps:
        raise InvalidUpdate(f"seed update: {n_seeds} steps, more than the maximum {max_steps}")
    finite = np.isfinite(update.scalars)
    if not finite.all():
        first = int(np.argmin(finite))
        raise InvalidUpdate(f"seed update: scalar {first} is not finite ({update.scalars[first]})")
    too_big = np.abs(update.scalars) > np.float32(max_abs_scalar)
    if too_big.any():
        first = int(np.argmax(too_big))
        raise InvalidUpdate(
            f"seed update: scalar {first} = {update.scalars[first]} exceeds the bound "
            f"|g| <= {max_abs_scalar}"
        )
    unique, counts = np.unique(update.seeds, return_counts=True)
    if (counts > 1).any():
        raise InvalidUpdate(f"seed update: duplicate seed {int(unique[np.argmax(counts > 1)])}")


# --- the codec -----------------------------------------------------------------------------


class SeedScalarCodec:
    """``seed-scalar`` codec: a forward-only client's :class:`SeedUpdate` as three arrays.

    ``encode`` sends the client's steps instead of its delta; ``decode`` parses and
    validates them against the round (:func:`validate_seed_update`: the round, the adapter
    layout, the coordinator's step and scalar bounds) and replays them from the round's
    global adapter (along ``ctx.last_step`` in the ``trajectory`` subspace) with the step
    size *the coordinator* sent, returning the client's delta
    bit for bit, which :func:`protocols.validation.validate_update` and the average then take
    like any dense delta.
    """

    name = SEED_CODEC_NAME
    lossy = False  # the coordinator replays the steps exactly

    def encode(self, update: ClientUpdate, ctx: RoundContext) -> ArrayRecord:
        if update.seed_update is None:
            raise ValueError(f"the {SEED_CODEC_NAME!r} codec sends a forward-only trainer's "
                             "seed/scalar steps; this update has none (a torch client uses "
                             "a dense codec)")
        return ArrayRecord({key: Array(value)
                            for key, value in update.seed_update.to_arrays().items()})

    def recognises(self, record: ArrayRecord) -> bool:
        return set(record.keys()) == WIRE_KEYS

    def parse(self, record: ArrayRecord) -> SeedUpdate:
        """Strictly parse an untrusted record; :class:`InvalidUpdate` on any defect."""
        arrays: dict[str, npt.NDArray[Any]] = {}
        for key, array in record.items():
            arrays[key] = load_npy_exact(key, array)
        return SeedUpdate.from_arrays(arrays)

    def decode(self, record: ArrayRecord, ctx: RoundContext) -> Tensors:
        if ctx.spec is None:
            raise ValueError("replaying seed/scalar steps needs the round's context: the "
                             "adapter spec is missing from the RoundContext")
        if ctx.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {ctx.max_steps}")
        if not (ctx.max_abs_scalar > 0 and math.isfinite(ctx.max_abs_scalar)):
            raise ValueError(f"max_abs_scalar must be finite and > 0, got {ctx.max_abs_scalar}")
        if not ctx.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {ctx.learning_rate}")
        update = self.parse(record)
        validate_seed_update(update, expected_round=ctx.server_round,
                             expected_layout=layout_id(trainable_shapes(ctx.spec),
                                                       ctx.subspace),
                             max_steps=ctx.max_steps, max_abs_scalar=ctx.max_abs_scalar)
        theta = apply_seed_updates(ctx.global_adapter, update.pairs(), spec=ctx.spec,
                                   learning_rate=ctx.learning_rate, subspace=ctx.subspace,
                                   last_step=ctx.last_step)
        return {k: theta[k] - ctx.global_adapter[k] for k in ctx.spec.trainable_keys}


def _register() -> None:
    # Already there if protocols.codecs lists it itself, or if this module was reloaded.
    with contextlib.suppress(ValueError):
        register_codec(SEED_CODEC_NAME, SeedScalarCodec)


_register()
