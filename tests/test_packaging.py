"""Packaging: the edge install brings no torch, and the torch-free modules import without it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Modules that must import without torch: what an edge device runs (the ClientApp, the ONNX
#: Runtime trainer, the daemon) and the coordinator's aggregation path.
TORCH_FREE_MODULES = [
    "protocols.keys", "protocols.adapter_spec", "protocols.codecs", "protocols.validation",
    "protocols.run_config", "protocols.records", "client.local_data", "client.trainer",
    "client.shakespeare", "server.strategy", "server.export", "server.secagg",
    "server.checkpoint", "protocols.seed_updates", "protocols.secagg.wire",
    "client.secagg_client", "client.app", "client.edge_trainer", "kernels.edge_runtime",
    "client.node.daemon", "client.node_policy",
    "server.service.certs",
]

BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_torch_free_modules_import_without_torch() -> None:
    code = BLOCK_TORCH + "".join(f"import {m}\n" for m in TORCH_FREE_MODULES) + (
        "assert 'torch' not in sys.modules\nprint('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.network
def test_edge_extra_resolves_without_torch(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--report", str(report), f"{ROOT}[edge]"],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime" in names and "flwr" in names
    heavy = names & {"torch", "transformers", "peft", "opacus", "ray", "nvidia-cublas-cu12"}
    assert not heavy, f"the edge extra would install {sorted(heavy)}"
