"""Where fedtune keeps what it prepares once: base models, signed manifests, exports, data.

Every party has one (a device its base model and ONNX export, the coordinator its signing
key and artifacts, a simulation the corpus and splits), found the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CACHE_ENV = "FEDTUNE_CACHE"


def default_cache_dir() -> Path:
    """``$FEDTUNE_CACHE`` or ``./.fedtune-cache``: project-local, so nothing outside the
    checkout is written and a fresh clone starts clean."""
    return Path(os.environ.get(CACHE_ENV, ".fedtune-cache")).resolve()


def add_cache_dir_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--cache-dir``, resolved with :func:`default_cache_dir` when not given."""
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="prepared models and data (default: $FEDTUNE_CACHE or "
                             "./.fedtune-cache)")
