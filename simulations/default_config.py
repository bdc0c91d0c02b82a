"""``simulations/configs/default.toml``: the main job's config, generated from the schema.

The file is what ``fedtune config`` prints with no options; ``tests`` check the two are
identical, so the file can never drift from :class:`protocols.run_config.RunConfig`'s
defaults. Regenerate it with ``fedtune config > simulations/configs/default.toml``.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TOML = Path(__file__).parent / "configs" / "default.toml"

HEADER = """\
# fedtune's defaults: SmolLM2-135M-Instruct + LoRA, one simulated device per Shakespeare role.
# Sized to finish in under 15 minutes on a 2-core CPU with a clear drop in held-out
# perplexity. Generated from protocols/run_config.py by `fedtune config`; a config file of
# your own needs only the keys it changes (`fedtune simulate --config mine.toml`).

"""
