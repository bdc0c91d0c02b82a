"""Process environment every fedtune entry point sets before Flower, Ray or HF load.

Each line was learned the hard way on these machines (docs/architecture.md, "Decisions and
why"): no telemetry or update checks (no network), no runtime ``uv sync`` (it would pull CUDA
torch), no hub access, and a project-local Flower home.
"""

from __future__ import annotations

import os
from pathlib import Path

#: What every fedtune process needs (also handed to the Flower daemons it starts,
#: ``protocols.processes.FLOWER_ENV``).
DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    # Ray's C++ failure-signal handler turns a SIGTERM to `fedtune simulate` into SIGABRT and
    # a stack dump before Python sees it; without it, the run stops like Ctrl-C (resumable).
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    # Library progress bars (Flower Datasets' partitioners, model shard writing) say nothing
    # a user needs and fill logs with carriage returns; fedtune shows its own progress.
    "TQDM_DISABLE": "1",
}


def configure_environment() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("FLWR_HOME", str(Path(".flwr").resolve()))
