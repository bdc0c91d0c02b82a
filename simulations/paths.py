"""Where the simulation's built-in corpus and its federated split live in the cache."""

from __future__ import annotations

from pathlib import Path


def shakespeare_texts_dir(cache_dir: Path) -> Path:
    return cache_dir / "data" / "shakespeare" / "texts"


def partitions_dir(cache_dir: Path) -> Path:
    return cache_dir / "partitions"
