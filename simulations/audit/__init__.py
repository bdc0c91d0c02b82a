"""Leakage audit: text gradient-inversion attacks on fedtune's own client updates.

The honest-but-curious coordinator (docs/architecture.md, "Threat model") attacks what it
really receives:

* :mod:`~simulations.audit.scenario` — the observed update, made by ``TorchLoraTrainer``,
  ``clip_update`` and the secure-aggregation primitives, safeguards off or on;
* :mod:`~simulations.audit.attacks` — an analytic bag-of-tokens attack on the LoRA ``B``
  updates and a TAG/DLG optimisation attack (Zhu et al. 2019; Deng et al. 2021;
  Balunovic et al. 2022);
* :mod:`~simulations.audit.metrics` — token recovery rate, bag-of-tokens recall, chance;
* :mod:`~simulations.audit.run` — the grid and ``main`` (``fedtune audit``,
  ``python -m simulations.audit``); :mod:`~simulations.audit.report` — JSON, table, plot;
* :mod:`~simulations.audit.models` — the audited models (truncated SmolLM2, tiny Llama).
"""

from simulations.audit.run import main

__all__ = ["main"]
