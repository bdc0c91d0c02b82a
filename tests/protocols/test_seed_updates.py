"""Seed/scalar (MeZO) updates: exact regeneration, exact replay, strict refusal, small uploads."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.adapter_spec import AdapterSpec
from protocols.codecs import ClientUpdate, RoundContext, get_codec, record_nbytes
from protocols.errors import InvalidUpdate
from protocols.seed_updates import (
    HEADER_KEY,
    SCALARS_KEY,
    SEED_CODEC_NAME,
    SEEDS_KEY,
    SeedScalarCodec,
    SeedUpdate,
    apply_seed_updates,
    direction,
    layout_id,
    perturbation,
    sgd_step,
    step_coefficient,
    trainable_shapes,
)

REPO = Path(__file__).resolve().parents[2]
A1, B1 = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"
A2, B2 = "m.layers.1.v_proj.lora_A.weight", "m.layers.1.v_proj.lora_B.weight"
SHAPES = {A1: (4, 32), B1: (32, 4), A2: (4, 32), B2: (48, 4)}


def _adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _spec(freeze_a: bool = True) -> AdapterSpec:
    frozen = frozenset(k for k in SHAPES if freeze_a and ".lora_A." in k)
    return AdapterSpec.from_arrays(_adapter(), {"r": 4}, frozen=frozen)


def _digest(z: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(z):
        h.update(key.encode() + z[key].astype("<f4").tobytes())
    return h.hexdigest()


# --- the direction -------------------------------------------------------------------------


def test_perturbation_is_rademacher_float32_over_the_given_shapes() -> None:
    z = perturbation(7, {B1: (32, 4), B2: (48, 4)})
    assert set(z) == {B1, B2}
    for key, value in z.items():
        assert value.dtype == np.float32 and value.shape == SHAPES[key]
        assert set(np.unique(value)) <= {-1.0, 1.0}
    flat = np.concatenate([z[B1].ravel(), z[B2].ravel()])
    assert abs(flat.mean()) < 0.2  # 320 fair signs: |mean| < 0.2 has probability > 0.999


def test_perturbation_depends_on_seed_and_not_on_mapping_order() -> None:
    one = perturbation(1, {B1: (32, 4), B2: (48, 4)})
    again = perturbation(1, {B2: (48, 4), B1: (32, 4)})  # keys sorted before use
    other = perturbation(2, {B1: (32, 4), B2: (48, 4)})
    assert _digest(one) == _digest(again)
    assert _digest(one) != _digest(other)


def test_perturbation_follows_the_documented_construction() -> None:
    # Recomputed from the module docstring with plain Python bit arithmetic.
    seed, shapes = 2**63 + 5, {"b": (3, 7), "a": (2, 3)}
    key = hashlib.sha256(b"fedtune/mezo-z/v1\x00" + seed.to_bytes(8, "little")).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4))
    bits = [(stream[i // 8] >> (i % 8)) & 1 for i in range(27)]
    signs = [1.0 if b == 0 else -1.0 for b in bits]
    z = perturbation(seed, shapes)
    assert z["a"].ravel().tolist() == signs[:6]  # "a" sorts first
    assert z["b"].ravel().tolist() == signs[6:]


def test_perturbation_golden_bits() -> None:
    # Format 1, seed 2**63 + 5, one (3, 7) tensor: a change here breaks every stored replay.
    z = perturbation(2**63 + 5, {"w": (3, 7)})["w"]
    assert "".join("+" if v > 0 else "-" for v in z.ravel()) == "-+++-+-+---+-++---+++"


def test_perturbation_is_bit_exact_in_another_process() -> None:
    shapes = {B1: (32, 4), B2: (48, 4), "x.lora_B.weight": (1000, 3)}
    seeds = [0, 1, 12345, 2**64 - 1]
    script = textwrap.dedent(f"""
        import hashlib
        from protocols.seed_updates import perturbation
        for seed in {seeds!r}:
            z = perturbation(seed, {shapes!r})
            h = hashlib.sha256()
            for key in sorted(z):
                h.update(key.encode() + z[key].astype("<f4").tobytes())
            print(h.hexdigest())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.split() == [_digest(perturbation(s, shapes)) for s in seeds]


@pytest.mark.parametrize(("seed", "error"), [(-1, ValueError), (2**64, ValueError),
                                             (1.5, TypeError), (True, TypeError)])
def test_perturbation_refuses_bad_seeds(seed: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="seed"):
        perturbation(seed, {B1: (2, 2)})  # type: ignore[arg-type]


# --- the replay ----------------------------------------------------------------------------


#: Distinct seeds with float32 projected gradients: a round's (seed, g) steps.
PAIRS = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.floats(-50, 50, width=32)),
                 min_size=1, max_size=12, unique_by=lambda p: p[0])


def _client_side(start: dict[str, np.ndarray], pairs: list[tuple[int, np.float32]],
                 spec: AdapterSpec, lr: float, eps: float = 1e-3,
                 subspace: str = "full", anchor: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """What the edge trainer does: clean θ, perturbations in a separate buffer; directions
    anchored at ``anchor`` (default: the start, as in ``components``)."""
    theta = {k: v.copy() for k, v in start.items()}
    probe = {k: v.copy() for k, v in start.items()}
    shapes = trainable_shapes(spec)
    for seed, g in pairs:
        z = direction(seed, shapes, subspace=subspace,
                      anchor=start if anchor is None else anchor)
        for key in z:
            np.add(theta[key], np.float32(eps) * z[key], out=probe[key])
            np.subtract(theta[key], np.float32(eps) * z[key], out=probe[key])
        sgd_step(theta, z, step_coefficient(lr, g))
    return theta


@settings(max_examples=15, deadline=None)
@given(
    PAIRS,
    st.floats(1e-6, 1e-1),
)
def test_server_replay_equals_client_bit_for_bit(pairs: list[tuple[int, float]],
                                                 lr: float) -> None:
    spec, start = _spec(), _adapter(3)
    typed = [(s, np.float32(g)) for s, g in pairs]
    client = _client_side(start, typed, spec, lr)
    server = apply_seed_updates(start, typed, spec=spec, learning_rate=lr)
    assert server.keys() == start.keys()
    for key in start:
        assert client[key].tobytes() == server[key].tobytes(), key


@settings(max_examples=10, deadline=None)
@given(
    PAIRS,
    st.floats(1e-3, 3.0),
)
def test_components_replay_equals_client_bit_for_bit(pairs: list[tuple[int, float]],
                                                     lr: float) -> None:
    spec, start = _spec(), _adapter(4)
    typed = [(s, np.float32(g)) for s, g in pairs]
    client = _client_side(start, typed, spec, lr, eps=1e-2, subspace="components")
    server = apply_seed_updates(start, typed, spec=spec, learning_rate=lr,
                                subspace="components")
    for key in start:
        assert client[key].tobytes() == server[key].tobytes(), key


def test_components_direction_rescales_each_component_of_the_anchor() -> None:
    """z = θ₀ with one sign per last-axis index (a B column): exactly ±θ₀, column-wise, and
    the signs are the format-1 bits over shapes (last axis,)."""
    start, shapes = _adapter(5), trainable_shapes(_spec())
    z = direction(9, shapes, subspace="components", anchor=start)
    signs = perturbation(9, {k: s[-1:] for k, s in shapes.items()})
    assert set(z) == set(shapes)
    for key in shapes:
        assert z[key].dtype == np.float32
        assert z[key].tobytes() == (start[key] * signs[key][None, :]).tobytes()
    # One step: each component of B scaled by exactly (1 - lr·g·u): relative, not absolute.
    out = apply_seed_updates(start, [(9, 0.5)], spec=_spec(), learning_rate=0.2,
                             subspace="components")
    ratio = out[B1] / start[B1]
    np.testing.assert_allclose(ratio, 1 - 0.1 * signs[B1][None, :].repeat(32, 0), rtol=1e-6)


def test_components_of_a_zero_adapter_move_nothing() -> None:
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    out = apply_seed_updates(start, [(1, 5.0)], spec=_spec(), learning_rate=1.0,
                             subspace="components")
    assert all(not out[k].any() for k in SHAPES)


def test_subspace_is_part_of_the_layout_and_full_keeps_its_fingerprint() -> None:
    shapes = trainable_shapes(_spec())
    assert layout_id(shapes) == layout_id(shapes, "full")
    assert layout_id(shapes, "components") != layout_id(shapes)
    with pytest.raises(ValueError, match="subspace must be one of"):
        direction(1, shapes, subspace="sparse", anchor=_adapter())
    with pytest.raises(ValueError, match="needs the round's global adapter"):
        direction(1, shapes, subspace="components")


def test_codec_refuses_steps_from_another_subspace() -> None:
    """A device in 'components' and a coordinator in 'full' (or back) never replay."""
    update = _update(4)  # laid out for 'full'
    with pytest.raises(InvalidUpdate, match=r"edge.subspace"):
        SeedScalarCodec().decode(_encode(update), _ctx(subspace="components"))
    start = _adapter(6)
    moved = SeedUpdate(base_round=ROUND, seeds=update.seeds, scalars=update.scalars,
                       layout=layout_id(trainable_shapes(_spec()), "components"))
    delta = SeedScalarCodec().decode(_encode(moved), _ctx(start, subspace="components"))
    client = _client_side(start, moved.pairs(), _spec(), LR,  # type: ignore[arg-type]
                          subspace="components")
    for key, value in delta.items():
        assert value.tobytes() == (client[key] - start[key]).tobytes()


def test_replay_changes_trainable_tensors_only_and_not_the_input() -> None:
    spec, start = _spec(freeze_a=True), _adapter(1)
    before = {k: v.copy() for k, v in start.items()}
    out = apply_seed_updates(start, [(5, 2.0), (6, -1.0)], spec=spec, learning_rate=0.01)
    for key in start:
        np.testing.assert_array_equal(start[key], before[key])
    assert np.array_equal(out[A1], start[A1]) and np.array_equal(out[A2], start[A2])
    assert not np.array_equal(out[B1], start[B1])
    # One step moves every trainable coordinate by exactly lr*g (z = ±1), up to rounding.
    one = apply_seed_updates(start, [(5, 2.0)], spec=spec, learning_rate=0.01)
    np.testing.assert_allclose(np.abs(one[B1] - start[B1]), 0.02, rtol=1e-4)


def test_plain_lora_perturbs_a_too() -> None:
    spec, start = _spec(freeze_a=False), _adapter(1)
    out = apply_seed_updates(start, [(5, 2.0)], spec=spec, learning_rate=0.01)
    assert all(not np.array_equal(out[k], start[k]) for k in SHAPES)


def test_replay_refuses_a_global_that_does_not_match_the_spec() -> None:
    start = _adapter()
    start[B1] = start[B1].astype(np.float64)
    with pytest.raises(ValueError, match=r"lora_B.weight`: expected float32 \(32, 4\)"):
        apply_seed_updates(start, [(1, 1.0)], spec=_spec(), learning_rate=0.1)


# --- the codec and validation --------------------------------------------------------------

ROUND, MAX_STEPS, BOUND, LR = 4, 12, 100.0, 1e-3


def _update(n: int = 12, *, base_round: int = ROUND) -> SeedUpdate:
    rng = np.random.default_rng(n)
    return SeedUpdate(
        base_round=base_round,
        seeds=rng.integers(0, 2**64, size=n, dtype=np.uint64),
        scalars=rng.uniform(-5, 5, size=n).astype(np.float32),
        layout=layout_id(trainable_shapes(_spec())),
    )


def _ctx(global_adapter: dict[str, np.ndarray] | None = None, **override: Any) -> RoundContext:
    """The round as the coordinator sent it: what the codec decodes against."""
    params: dict[str, Any] = dict(global_adapter=global_adapter or _adapter(), spec=_spec(),
                                  server_round=ROUND, learning_rate=LR, max_steps=MAX_STEPS,
                                  max_abs_scalar=BOUND)
    params.update(override)
    return RoundContext(**params)


def _encode(update: SeedUpdate) -> ArrayRecord:
    return SeedScalarCodec().encode(ClientUpdate({}, update), RoundContext({}))


def test_codec_is_registered_and_round_trips() -> None:
    codec = get_codec(SEED_CODEC_NAME)
    assert isinstance(codec, SeedScalarCodec)
    update = _update()
    back = codec.parse(codec.encode(ClientUpdate({}, update), RoundContext({})))
    assert back.base_round == ROUND and back.layout == update.layout
    np.testing.assert_array_equal(back.seeds, update.seeds)
    assert back.scalars.tobytes() == update.scalars.tobytes()


def test_codec_decodes_to_the_clients_delta_bit_for_bit() -> None:
    start, update = _adapter(2), _update(8)
    delta = SeedScalarCodec().decode(_encode(update), _ctx(start))
    assert set(delta) == set(_spec().trainable_keys)
    client = _client_side(start, update.pairs(), _spec(), LR)  # type: ignore[arg-type]
    for key, value in delta.items():  # what client.app sends as a dense delta
        assert value.tobytes() == (client[key] - start[key]).tobytes()


def test_decode_without_the_rounds_context_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="needs the round's context"):
        SeedScalarCodec().decode(_encode(_update()), RoundContext(_adapter()))
    with pytest.raises(ValueError, match="this update has none"):
        SeedScalarCodec().encode(ClientUpdate({}), RoundContext({}))


@pytest.mark.parametrize("steps", [8, 12])
def test_default_upload_is_under_one_kilobyte(steps: int) -> None:
    record = _encode(_update(steps))
    nbytes = record_nbytes(record)
    # 12 bytes a step + three .npy headers (128 bytes each) + a 24-byte header array.
    assert nbytes == 12 * steps + 3 * 128 + 24
    assert nbytes <= 1024


def _arrays(update: SeedUpdate, **override: np.ndarray) -> ArrayRecord:
    arrays = update.to_arrays()
    arrays.update(override)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _header(base_round: int = ROUND, layout: int | None = None, version: int = 1) -> np.ndarray:
    layout = layout_id(trainable_shapes(_spec())) if layout is None else layout
    return np.array([version, base_round, layout], dtype="<i8")


GOOD = _update()
BAD_RECORDS = [
    (_arrays(GOOD, **{HEADER_KEY: _header(ROUND - 1)}), "stale base round 3, expected round 4"),
    (_arrays(GOOD, **{HEADER_KEY: _header(ROUND + 1)}), "future base round 5, expected round 4"),
    (_arrays(GOOD, **{HEADER_KEY: _header(layout=123)}), "layout differs"),
    (_arrays(GOOD, **{HEADER_KEY: _header(version=2)}), "format 2 is not the supported 1"),
    (_arrays(GOOD, **{HEADER_KEY: _header()[:2]}), "expected 3 entries, got 2"),
    (_arrays(GOOD, **{SCALARS_KEY: GOOD.scalars[:-1]}), "12 seeds but 11 scalars"),
    (_arrays(GOOD, **{SEEDS_KEY: GOOD.seeds[:0], SCALARS_KEY: GOOD.scalars[:0]}),
     "no steps (zero pairs)"),
    (_arrays(_update(13)), "13 steps, more than the maximum 12"),
    (_arrays(GOOD, **{SCALARS_KEY: np.r_[GOOD.scalars[:5], np.nan, GOOD.scalars[6:]]
                      .astype(np.float32)}), "scalar 5 is not finite (nan)"),
    (_arrays(GOOD, **{SCALARS_KEY: np.r_[np.inf, GOOD.scalars[1:]].astype(np.float32)}),
     "scalar 0 is not finite (inf)"),
    (_arrays(GOOD, **{SCALARS_KEY: np.r_[GOOD.scalars[:3], -100.5, GOOD.scalars[4:]]
                      .astype(np.float32)}), "scalar 3 = -100.5 exceeds the bound |g| <= 100.0"),
    (_arrays(GOOD, **{SCALARS_KEY: GOOD.scalars.astype(np.float64)}),
     "`mezo-scalars`: expected dtype float32, got float64"),
    (_arrays(GOOD, **{SEEDS_KEY: GOOD.seeds.astype(np.int64)}),
     "`mezo-seeds`: expected dtype uint64, got int64"),
    (_arrays(GOOD, **{SEEDS_KEY: GOOD.seeds.astype(">u8")}), "`mezo-seeds`: expected dtype"),
    (_arrays(GOOD, **{HEADER_KEY: _header().astype(np.int32)}), "`mezo-header`: expected dtype"),
    (_arrays(GOOD, **{SEEDS_KEY: GOOD.seeds.reshape(3, 4)}), "expected a 1-D array"),
    (_arrays(GOOD, **{SEEDS_KEY: np.r_[GOOD.seeds[:11], GOOD.seeds[2]].astype(np.uint64)}),
     f"duplicate seed {int(GOOD.seeds[2])}"),
    (_arrays(GOOD, extra=np.zeros(1, np.float32)), "unexpected arrays ['extra']"),
    (ArrayRecord({SEEDS_KEY: Array(GOOD.seeds)}),
     "missing arrays ['mezo-header', 'mezo-scalars']"),
    (ArrayRecord({SEEDS_KEY: Array(dtype="uint64", shape=(1,), stype="numpy.ndarray",
                                   data=b"junk")}), "payload is not a valid .npy array"),
    (ArrayRecord({SEEDS_KEY: Array(dtype="uint64", shape=(1,), stype="torch.raw",
                                   data=b"junk")}), "expected serialisation 'numpy.ndarray'"),
]


@pytest.mark.parametrize(("record", "reason"), BAD_RECORDS, ids=[r for _, r in BAD_RECORDS])
def test_bound_codec_rejects_with_reason(record: ArrayRecord, reason: str) -> None:
    with pytest.raises(InvalidUpdate) as err:
        SeedScalarCodec().decode(record, _ctx())
    assert reason in err.value.reason


def test_good_record_passes_the_same_checks() -> None:
    assert len(SeedScalarCodec().decode(_arrays(GOOD), _ctx())) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"seeds": np.zeros(2, np.int64)}, "seeds: expected a uint64 array, got int64"),
    ({"scalars": [1.0, 2.0]}, "scalars: expected a float32 array, got list"),
    ({"seeds": np.zeros((1, 2), np.uint64)}, "seeds: expected a 1-D array"),
])
def test_seed_update_checks_its_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"base_round": 1, "seeds": np.arange(2, dtype=np.uint64),
                                 "scalars": np.ones(2, np.float32), "layout": 0}
    fields.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=message):
        SeedUpdate(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"max_abs_scalar": float("inf")}, "max_abs_scalar must be finite"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
])
def test_decode_checks_the_rounds_security_parameters(kwargs: dict[str, float],
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SeedScalarCodec().decode(_encode(_update()), _ctx(**kwargs))


# --- the trajectory subspace -----------------------------------------------------------------


def _last_step(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.01 * rng.standard_normal(s)).astype(np.float32)
            for k, s in trainable_shapes(_spec()).items()}


def test_trajectory_direction_is_the_last_step_with_one_sign() -> None:
    """z = u·Δ with u the seed's first format-1 bit as a sign: exactly ±Δ, every tensor
    with the same sign; each subspace has its own layout fingerprint."""
    shapes, step = trainable_shapes(_spec()), _last_step()
    signs = set()
    for seed in range(8):
        z = direction(seed, shapes, subspace="trajectory", anchor=step)
        sign = float(perturbation(seed, {"sign": (1,)})["sign"][0])
        signs.add(sign)
        for key in shapes:
            assert z[key].dtype == np.float32
            assert z[key].tobytes() == (sign * step[key]).tobytes()
    assert signs == {-1.0, 1.0}
    ids = {layout_id(shapes, s) for s in ("full", "components", "trajectory")}
    assert len(ids) == 3
    with pytest.raises(ValueError, match="last step"):
        direction(1, shapes, subspace="trajectory")


@settings(max_examples=10, deadline=None)
@given(
    PAIRS,
    st.floats(1e-3, 30.0),
)
def test_trajectory_replay_equals_client_bit_for_bit(pairs: list[tuple[int, float]],
                                                     lr: float) -> None:
    """The replay anchored at the coordinator's Δ is the client's adapter, bit for bit,
    and moves the trainable tensors along Δ only."""
    spec, start, step = _spec(), _adapter(4), _last_step()
    typed = [(s, np.float32(g)) for s, g in pairs]
    theta = _client_side(start, typed, spec, lr, eps=1e-2, subspace="trajectory", anchor=step)
    server = apply_seed_updates(start, typed, spec=spec, learning_rate=lr,
                                subspace="trajectory", last_step=step)
    for key in start:
        assert theta[key].tobytes() == server[key].tobytes(), key
    moved = server[B1] - start[B1]
    s = float(np.sum(moved * step[B1]) / np.sum(step[B1] ** 2))
    np.testing.assert_allclose(moved, s * step[B1], rtol=1e-3, atol=1e-5)


def test_trajectory_replay_needs_a_last_step_of_the_right_shape() -> None:
    spec, start = _spec(), _adapter(1)
    with pytest.raises(ValueError, match="needs the coordinator's last step"):
        apply_seed_updates(start, [(1, 1.0)], spec=spec, learning_rate=1.0,
                           subspace="trajectory")
    bad = {**_last_step(), B1: np.zeros((4, 32), np.float32)}
    with pytest.raises(ValueError, match=r"last step `.*`: expected float32 \(32, 4\)"):
        apply_seed_updates(start, [(1, 1.0)], spec=spec, learning_rate=1.0,
                           subspace="trajectory", last_step=bad)
