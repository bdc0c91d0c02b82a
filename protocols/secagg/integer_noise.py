"""Parameters of a quantized secure-aggregation round with client-level DP (Skellam noise).

Why a plan of its own: with DP the grid of a quantized upload is no longer the codec's
alone. The rounding must not inflate the sensitivity much (the scaled clip norm ``s·C`` must
dwarf the ``√d/2`` a stochastic rounding may add), and the modulus must hold the summed noise,
not only the codes. So the coordinator derives, per round, from the clip norm ``C``, noise
multiplier ``σ``, the masked dimension ``d`` and the number of clients:

* the scale ``s``: the codec's ``levels / range``, or finer where DP needs it;
* ``Δ2`` (:func:`~protocols.privacy.skellam.rounding_norm_bound`), the L2 bound every device
  enforces on its rounded update, and ``Δ1``;
* the Skellam variance ``μ`` whose RDP is at most the Gaussian's at ``σ``
  (:func:`~protocols.privacy.skellam.skellam_variance_for`), split over the ``t`` devices
  the threshold guarantees (more survivors add more noise, never less);
* the modulus: ``n · ceil(s · range)`` for the codes plus a Bernstein bound the summed
  noise exceeds with probability below ``1e-12`` per coordinate, and the decoder's bound
  for each coordinate; at most 32 bits (a masked quantized upload is at most a word).

The bits per coordinate then follow the noise, ``log2(16 σ s C)`` and a little, whatever the
codec's levels: about 15 at ``σ = 1`` for a LoRA-sized update, against 32 for fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocols.privacy.skellam import (
    NOISE_TAIL,
    integer_norm_for,
    l1_bound,
    noise_tail_bound,
    rounding_norm_bound,
    skellam_variance_for,
)
from protocols.secagg.fixed_point import check_headroom, quantized_scale


@dataclass(frozen=True)
class IntegerNoisePlan:
    """What every device is told (scale, coordinate range, ``Δ2``, its noise variance, the
    modulus) and what the coordinator decodes with (``noise_bound``)."""

    scale: float
    clip_range: float
    rounding_bound: float
    l1_bound: float
    total_variance: float  # of the summed noise over the threshold's devices, code units
    per_client_variance: float
    noise_bound: int
    modulus_bits: int

    @property
    def noise_std(self) -> float:
        """Std of the summed noise in update units: ``σ·C`` and the rounding's inflation."""
        return math.sqrt(self.total_variance) / self.scale


def plan_integer_noise(
    *, num_clients: int, threshold: int, dim: int, clip_norm: float,
    noise_multiplier: float, quant_range: float, levels: int,
) -> IntegerNoisePlan:
    """The round's parameters (module docstring); ``num_clients`` is the most devices whose
    uploads may be summed, ``threshold`` the fewest."""
    if not 1 <= threshold <= num_clients:
        raise ValueError(f"threshold {threshold} must be in [1, num_clients = {num_clients}]")
    coordinate = min(quant_range, clip_norm)  # an L2-clipped vector has no larger coordinate
    scale = max(quantized_scale(levels, coordinate), integer_norm_for(dim) / clip_norm)
    l2 = rounding_norm_bound(scale * clip_norm, dim)
    l1 = l1_bound(l2, dim)
    total = skellam_variance_for(noise_multiplier, l2=l2, l1=l1)
    per_client = total / threshold
    noise_bound = noise_tail_bound(num_clients * per_client, tail=NOISE_TAIL)
    largest = num_clients * math.ceil(coordinate * scale) + noise_bound
    modulus_bits = max(2, largest.bit_length() + 1)
    if modulus_bits > 32:
        raise ValueError(
            f"the noised sum of {num_clients} quantized uploads needs {modulus_bits} bits, "
            "more than the 32 a quantized upload may take: lower the noise multiplier or the "
            "clients per round, or use codec 'fp32'")
    check_headroom(num_clients=num_clients, clip=coordinate, scale=scale,
                   modulus_bits=modulus_bits)
    return IntegerNoisePlan(
        scale=scale, clip_range=coordinate, rounding_bound=l2, l1_bound=l1,
        total_variance=total, per_client_variance=per_client, noise_bound=noise_bound,
        modulus_bits=modulus_bits)
