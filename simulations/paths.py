"""Where prepared models, data and runs live on the simulating host."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CACHE_ENV = "FEDTUNE_CACHE"


def default_cache_dir() -> Path:
    """``$FEDTUNE_CACHE`` or ``./.fedtune-cache``: project-local, so nothing outside the
    checkout is written and a fresh clone starts clean."""
    return Path(os.environ.get(CACHE_ENV, ".fedtune-cache")).resolve()


def shakespeare_texts_dir(cache_dir: Path) -> Path:
    return cache_dir / "data" / "shakespeare" / "texts"


def partitions_dir(cache_dir: Path) -> Path:
    return cache_dir / "partitions"


def add_cache_dir_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--cache-dir``, resolved with :func:`default_cache_dir` when not given."""
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="prepared models and data (default: $FEDTUNE_CACHE or "
                             "./.fedtune-cache)")
