"""Which devices a round samples: a generator of fedtune's own behind Flower's sampler.

Flower 1.41's strategies sample with ``random.sample`` on the process-global ``random``
(``flwr.serverapp.strategy.strategy_utils.sample_nodes``). Two things go wrong with that:

- *Reproducibility.* Other code in the ServerApp's process draws from the same generator
  at times that depend on scheduling (in the Simulation Engine, Ray starts up on the main
  thread while the ServerApp thread begins round 1, ~60 draws), so seeding it once did not
  fix which devices trained.
- *Privacy.* Client-level DP's accountant credits each round with amplification by
  subsampling (rate ``q``), which holds only if the sample is a secret random draw; one that
  every participant can recompute from the run config's seed gives no such amplification.

So the sampler is ours: a :class:`RoundSampler` seeded by ``train.seed`` and the round
number by default — each round's sample depends on nothing but them, so a run resumed after
round ``k`` samples round ``k + 1`` exactly as the uninterrupted run did —, the operating
system's generator (``random.SystemRandom``) when client-level DP is on — by default as a
Poisson sample (:class:`PoissonSampler`, ``privacy.client_sampling``).
:func:`server.flower_patches.flower_samples_with` puts it behind ``sample_nodes`` for the
rounds of one run, and puts Flower's back when the run ends.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class RoundSampler(random.Random):
    """``random.Random`` reseeded at the start of every round from (seed, round)."""

    def __init__(self, seed: int) -> None:
        self.run_seed = seed
        super().__init__(f"fedtune-sampling|{seed}")

    def begin_round(self, server_round: int, attempt: int = 0) -> None:
        """Reseed for a round (``attempt`` > 0: a retry of a round whose devices all failed,
        :mod:`server.round_retry`, which samples afresh but just as reproducibly)."""
        suffix = f"|retry{attempt}" if attempt else ""
        self.seed(f"fedtune-sampling|{self.run_seed}|{server_round}{suffix}")


class SecretSampler(random.SystemRandom):
    """The operating system's generator; rounds change nothing (there is no state)."""

    def begin_round(self, server_round: int, attempt: int = 0) -> None:
        """Nothing to reseed: every draw is fresh OS entropy."""


class PoissonSampler(SecretSampler):
    """Poisson sampling, secret: asked for ``k`` of ``N`` nodes, every node joins
    independently with probability ``q = k / N`` (the cohort size varies, may be 0). The
    subsampled Gaussian mechanism the privacy accountant composes assumes exactly this;
    a fixed-size sample is only its usual approximation."""

    def sample(self, population: Sequence[T], k: int, *, counts: object = None) -> list[T]:
        if counts is not None:
            raise ValueError("Poisson sampling takes no counts")
        members = list(population)
        if not members:
            return []
        q = min(1.0, k / len(members))
        return [m for m in members if self.random() < q]


def node_sampler(seed: int, *, secret: bool, poisson: bool = False
                 ) -> RoundSampler | SecretSampler:
    """The generator a run's rounds sample devices with (see the module docstring):
    ``poisson`` (secret only) for client-level DP's Poisson sampling."""
    if poisson and not secret:
        raise ValueError("Poisson sampling is for client-level DP, whose sample is secret")
    if poisson:
        return PoissonSampler()
    return SecretSampler() if secret else RoundSampler(seed)
