"""The Flower App folder that ``flwr run`` bundles into a FAB (Flower App Bundle).

The FAB carries configuration only: a ``pyproject.toml`` naming fedtune's ServerApp and
the deployed ClientApp, with the whole resolved run config baked into
``[tool.flwr.app.config]``. Code comes from the ``fedtune`` package installed on every
party (Flower puts the app folder first on ``sys.path`` and then imports
``server.app:app``), so devices never execute code the coordinator ships, the FAB stays a
few KB (Flower's limit is 10 MB), and weights and data never travel in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.common.constant import FAB_MAX_SIZE

#: The ServerApp and ClientApp Flower loads from the installed fedtune package.
SERVER_APP = "server.app:app"
CLIENT_APP = "client.app:app"
APP_NAME = "fedtune-app"
PUBLISHER = "fedtune"


def write_app(app_dir: Path, run_config: Mapping[str, Any], *, version: str) -> Path:
    """Write ``app_dir/pyproject.toml`` for a run with ``run_config`` (flat keys); return it.

    ``version`` is fedtune's version; the FAB pins it so a node with another release
    installed is visible in the FAB metadata.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    stray = sorted(p.name for p in app_dir.iterdir() if p.name != "pyproject.toml")
    if stray:
        raise FileExistsError(
            f"{app_dir} holds {stray}: the app folder is bundled whole, so it must contain "
            "only the generated pyproject.toml; use an empty folder"
        )
    lines = [
        "[project]",
        f'name = "{APP_NAME}"',
        f"version = {_toml_value(version)}",
        'description = "fedtune: federated LoRA fine-tuning (config-only Flower App)"',
        'license = "Apache-2.0"',
        f'dependencies = ["flwr>=1.41.0,<1.42", "fedtune=={version}"]',
        "",
        "[tool.flwr.app]",
        f'publisher = "{PUBLISHER}"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{CLIENT_APP}"',
        "",
        "[tool.flwr.app.config]",
    ]
    for key in sorted(run_config):
        lines.append(f"{json.dumps(key)} = {_toml_value(run_config[key])}")
    path = app_dir / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if path.stat().st_size > FAB_MAX_SIZE:
        raise ValueError(f"{path} is over Flower's FAB limit of {FAB_MAX_SIZE} bytes")
    return path


def _toml_value(value: Any) -> str:
    """A TOML scalar. Flower's run config holds bool, int, float and str only."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run config value {value!r}: TOML cannot carry it portably")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"run config value {value!r}: expected bool, int, float or str, "
                    f"got {type(value).__name__}")
