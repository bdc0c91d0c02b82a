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

So the sampler is ours: ``random.Random`` seeded by ``train.seed`` by default (runs repeat
exactly), the operating system's generator (``random.SystemRandom``) when client-level DP
is on. :func:`server.flower_patches.flower_samples_with` puts it behind ``sample_nodes``
for the rounds of one run, and puts Flower's back when the run ends.
"""

from __future__ import annotations

import random


def node_sampler(seed: int, *, secret: bool) -> random.Random:
    """The generator a run's rounds sample devices with (see the module docstring)."""
    return random.SystemRandom() if secret else random.Random(f"fedtune-sampling|{seed}")
