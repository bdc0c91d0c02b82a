"""Quantized uploads inside secure aggregation (issue 16, point 2): the order clip → noise →
quantize on the device, and exact sums of stochastic codes in a small modulus."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import RecordDict

from client.secagg_client import protect_and_encode
from protocols.secagg import decode_sum, encode
from protocols.secagg.fixed_point import (
    check_headroom,
    quantized_modulus_bits,
    quantized_scale,
)
from protocols.secagg.masks import masked_input, new_seed
from protocols.secagg.unmask import remove_masks, sum_masked
from protocols.secagg.wire import RECORD, MaskingInstruction


def _instruction(levels: int, n: int, *, clip_range: float, dp: bool) -> MaskingInstruction:
    return MaskingInstruction(
        round_id=1, ciphertexts={}, levels=levels, clip_range=clip_range,
        modulus_bits=quantized_modulus_bits(n, levels), scale=quantized_scale(levels, clip_range),
        dp_clip_norm=1.0 if dp else 0.0, dp_noise_std=0.05 if dp else 0.0)


def _encode(x: np.ndarray, inst: MaskingInstruction) -> tuple[np.ndarray, np.ndarray | None]:
    return protect_and_encode(x, inst, num_clients=4, noise_rng=np.random.default_rng(1),
                              rounding_rng=np.random.default_rng(2))


def test_dp_clip_and_noise_come_before_quantization() -> None:
    """With a Gaussian share, the encoder sees the update only through its clipped, noised
    value: two updates with the same clipped direction give the same codes (same noise and
    rounding draws), and what the device would keep for error feedback is the encoding's
    loss, never the noise. (This is the order of every exact fixed-point upload. The wire
    refuses Gaussian shares on coarse quantized uploads, where one device's rounding of its
    own share would not sum to a Gaussian: those round first and add Skellam noise, below.)"""
    inst = _instruction(7, 4, clip_range=0.2, dp=True)
    x = np.random.default_rng(0).normal(size=400)
    x *= 5.0 / np.linalg.norm(x)  # far beyond the clip norm C = 1
    codes, lost = _encode(x, inst)
    again, _ = _encode(3.0 * x, inst)
    np.testing.assert_array_equal(codes, again)
    inside, _ = _encode(x / 10.0, inst)  # norm 0.5 <= C: not clipped, so other codes
    assert not np.array_equal(codes, inside)
    # what the coordinator adds + what the device keeps = the clipped, noised vector
    noise = np.random.default_rng(1).normal(0.0, inst.dp_noise_std, size=x.shape)
    noised = x / np.linalg.norm(x) + noise
    sent = decode_sum(codes, scale=inst.scale, clip=inst.clip_range,
                      modulus_bits=inst.modulus_bits, num_clients=1)
    assert lost is not None
    np.testing.assert_allclose(sent + lost, noised, atol=1e-6)
    step = inst.clip_range / inst.levels
    inside_grid = np.abs(noised) <= inst.clip_range
    assert np.all(np.abs(lost[inside_grid]) <= step)  # rounding only, no noise carried


def test_exact_fixed_point_needs_no_residual() -> None:
    inst = MaskingInstruction(round_id=1, ciphertexts={}, modulus_bits=32, scale=2.0**20,
                              clip_range=0.5)
    codes, lost = _encode(np.linspace(-0.1, 0.1, 50), inst)
    assert lost is None and codes.dtype == np.uint32


@pytest.mark.parametrize(("levels", "n"), [(1, 2), (7, 2), (7, 6), (127, 100), (1, 1000)])
def test_masked_codes_sum_exactly_in_the_fewest_bits(levels: int, n: int) -> None:
    """Codes at the extremes (every client at +L or -L) sum without wrapping in
    m = bit_length(n L) + 1 bits, masks cancel mod 2**m, and one bit fewer is refused."""
    bits = quantized_modulus_bits(n, levels)
    assert n * levels < 2 ** (bits - 1) <= 2 * n * levels
    clip = 0.01
    scale = quantized_scale(levels, clip)
    rng = np.random.default_rng(levels * n)
    xs = [rng.choice([-clip, clip, 0.3 * clip], size=64) for _ in range(n)]
    xs[0][:] = clip
    common = {"scale": scale, "clip": clip, "modulus_bits": bits, "num_clients": n}
    seeds = {i: new_seed() for i in range(n)}
    pair = {(i, j): new_seed() for i in range(n) for j in range(i + 1, n)} if n <= 6 else {}
    uploads, codes = {}, []
    for i, x in enumerate(xs):
        enc = encode(x, rng=np.random.default_rng(i), **common)
        assert enc.dtype == np.uint32 and int(enc.max()) < 2**bits
        own = decode_sum(enc, **{**common, "num_clients": 1}).astype(np.float64)
        codes.append(np.rint(own * scale).astype(np.int64))
        peers = {j: pair[min(i, j), max(i, j)] for j in range(n) if j != i and pair}
        uploads[i] = masked_input(enc, own_id=i, peers=peers, self_seed=seeds[i],
                                  modulus_bits=bits)
    total = remove_masks(sum_masked(uploads, modulus_bits=bits), self_seeds=seeds,
                         dropped_pair_seeds={}, modulus_bits=bits)
    got = np.rint(decode_sum(total, **common).astype(np.float64) * scale).astype(np.int64)
    np.testing.assert_array_equal(got, np.sum(codes, axis=0))  # the integers, exactly
    with pytest.raises(ValueError, match="fixed-point sum can overflow"):
        check_headroom(num_clients=n, clip=clip, scale=scale, modulus_bits=bits - 1)


def test_stochastic_codes_are_unbiased() -> None:
    clip, levels = 0.01, 1
    x = np.linspace(-clip, clip, 41)
    common = {"scale": quantized_scale(levels, clip), "clip": clip, "modulus_bits": 3,
              "num_clients": 1}
    runs = np.stack([decode_sum(encode(x, rng=np.random.default_rng(s), **common), **common)
                     for s in range(2000)])
    # each value is one of two grid points; the std of a 2,000-draw mean is <= clip / 89
    assert np.all(np.abs(runs.mean(axis=0) - x) <= 5 * clip / 2 / np.sqrt(2000))


def test_dp_on_a_quantized_upload_rounds_first_then_adds_integer_noise() -> None:
    """Skellam mode (issue 16, point 2 with DP): clip to C, clip coordinates, scale, round
    within Δ2, *then* add Skellam noise in the integers. The codes depend on the update only
    through its clipped value; the rounded vector (the codes less the device's noise) is an
    integer vector of norm <= Δ2 within one step of the scaled, clipped update; no residual
    is kept (it would carry un-noised rounding forward)."""
    from protocols.privacy.skellam import sample_skellam
    from protocols.secagg.fixed_point import wrap_integers
    from protocols.secagg.integer_noise import plan_integer_noise

    plan = plan_integer_noise(num_clients=4, threshold=3, dim=400, clip_norm=1.0,
                              noise_multiplier=0.8, quant_range=0.2, levels=7)
    inst = MaskingInstruction(
        round_id=1, ciphertexts={}, levels=7, clip_range=plan.clip_range, scale=plan.scale,
        modulus_bits=plan.modulus_bits, dp_clip_norm=1.0, rounding_bound=plan.rounding_bound,
        skellam_variance=plan.per_client_variance)
    assert inst.integer_noise and MaskingInstruction.from_record(
        RecordDict({RECORD: inst.to_record()})) == inst
    x = np.random.default_rng(0).normal(size=400)
    x *= 5.0 / np.linalg.norm(x)  # beyond C = 1: clipped
    codes, lost = _encode(x, inst)
    assert lost is None and codes.dtype == np.uint32
    again, _ = _encode(3.0 * x, inst)
    np.testing.assert_array_equal(codes, again)
    noise = sample_skellam(np.random.default_rng(1), inst.skellam_variance, 400)
    rounded = (wrap_integers(-noise, inst.modulus_bits).astype(np.int64) + codes) % (
        1 << inst.modulus_bits)
    rounded = np.where(rounded >= 1 << (inst.modulus_bits - 1),
                       rounded - (1 << inst.modulus_bits), rounded)
    target = np.clip(x / np.linalg.norm(x), -inst.clip_range, inst.clip_range) * inst.scale
    assert np.all(np.abs(rounded - target) < 1)
    assert float(np.linalg.norm(rounded)) <= inst.rounding_bound
    with pytest.raises(ValueError, match="NaN or infinite"):
        _encode(np.full(400, np.nan), inst)


def test_a_device_refuses_integer_noise_parameters_before_it_looks_at_its_update() -> None:
    """A rounding bound below what a clipped update needs would make the rounding fail on
    some updates and not others (a bit about the update, outside the noise); the device
    refuses it whatever its data, as it refuses a wire record mixing the noise kinds."""
    from protocols.secagg.integer_noise import plan_integer_noise
    from protocols.secagg.wire import SecAggProtocolError

    plan = plan_integer_noise(num_clients=4, threshold=3, dim=400, clip_norm=1.0,
                              noise_multiplier=0.8, quant_range=0.2, levels=7)
    fields = {"round_id": 1, "ciphertexts": {}, "levels": 7, "clip_range": plan.clip_range,
              "scale": plan.scale, "modulus_bits": plan.modulus_bits, "dp_clip_norm": 1.0,
              "skellam_variance": plan.per_client_variance}
    tight = MaskingInstruction(**fields, rounding_bound=plan.rounding_bound * 0.99)
    for update in (np.zeros(400), np.full(400, 0.001)):
        with pytest.raises(SecAggProtocolError, match=r"rounding bound .* is below"):
            _encode(update, tight)
    good = MaskingInstruction(**fields, rounding_bound=plan.rounding_bound)
    for bad, why in [({"levels": 0}, "quantized upload"),
                     ({"rounding_bound": 0.0}, "needs rounding-bound"),
                     ({"dp_noise_std": 0.1}, "rounding each device's Gaussian share"),
                     ({"dp_clip_norm": 0.0}, "needs both dp-clip-norm")]:
        record = RecordDict({RECORD: MaskingInstruction(
            **{**dataclasses.asdict(good), **bad}).to_record()})
        with pytest.raises(SecAggProtocolError, match=why):
            MaskingInstruction.from_record(record)
