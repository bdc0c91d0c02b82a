"""Where the simulation's built-in corpus lives in the cache (its devices' folders:
:mod:`simulations.devices`)."""

from __future__ import annotations

from pathlib import Path


def shakespeare_texts_dir(cache_dir: Path) -> Path:
    return cache_dir / "data" / "shakespeare" / "texts"
