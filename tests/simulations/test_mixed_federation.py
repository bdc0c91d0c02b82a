"""Mixed federation: torch (backprop) and edge (ONNX Runtime, forward-only) clients improve
one global adapter on the real Simulation Engine; the edge ClientApp runs without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from protocols.run_config import RunConfig
from tests.measured import within

pytestmark = pytest.mark.slow


def _config(tiny_model_dir: Path, **security: object) -> RunConfig:
    return RunConfig.from_nested({
        "model": {"source": str(tiny_model_dir)},
        "data": {"min_examples": 5, "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"rounds": 2, "clients_per_round": 4, "local_steps": 3, "batch_size": 2,
                  "seq_len": 16, "learning_rate": 0.01},
        "eval": {"max_blocks": 6, "batch_size": 4},
        # partitions 0 and 3 are edge devices with data.seed 0 (EdgeSection.is_edge)
        "edge": {"fraction": 0.5, "learning_rate": 0.3, "local_steps": 8},
        "security": dict(security),
    })


@pytest.mark.measured
def test_mixed_torch_and_edge_clients_train_one_adapter(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path
) -> None:
    from simulations.runner import check_inputs, run_federated

    inputs = check_inputs(_config(tiny_model_dir, secagg=False), mini_cache)
    assert inputs.edge_export is not None and (inputs.edge_export / "model.onnx").is_file()
    run_dir = run_federated(inputs, tmp_path / "runs", name="mixed")

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["rejected"] == 0 and row["failed"] == 0
        assert row["clients_by_kind"] == {"edge": 2, "torch": 2}
        edge_bytes = row["bytes_up_by_kind"]["edge"] / 2
        torch_bytes = row["bytes_up_by_kind"]["torch"] / 2
        assert edge_bytes <= 1024, "an edge update is seeds and scalars: under 1 KB"
        assert torch_bytes > 10 * edge_bytes  # tiny model: B only is 6.9 KB
    assert all(np.isfinite(r["perplexity"]) for r in rows)
    within("round-2 / round-0 held-out perplexity", rows[-1]["perplexity"] / rows[0]["perplexity"],
           below=1.0)
    assert "Bytes up per client per round, by kind" in (run_dir / "report.html").read_text()


def test_edge_clients_under_secure_aggregation_send_masked_dense_updates(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path
) -> None:
    from simulations.runner import check_inputs, run_federated

    nested = _config(tiny_model_dir).to_nested()
    nested["train"]["rounds"] = 1
    nested["edge"]["line_search"] = [0, 1, 4]  # scored on the unmasked sum's step
    inputs = check_inputs(RunConfig.from_nested(nested), mini_cache)
    run_dir = run_federated(inputs, tmp_path / "runs", name="mixed-secagg")
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert row["clients"] == 4 and row["clients_by_kind"] == {"edge": 2, "torch": 2}
    assert row["line_search_judges"] == 2 and row["line_search_multiple"] in (0, 1, 4)
    edge, torch = row["bytes_up_by_kind"]["edge"], row["bytes_up_by_kind"]["torch"]
    assert edge / 2 > 1024, "under SecAgg an edge client sends the dense masked delta"
    assert abs(edge - torch) <= 64  # same masked vector; metrics differ by one entry


BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "peft", "opacus"}:
            raise ImportError(f"{name} is not installed on this edge device")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize(("edge_codec", "arrays"), [
    ("seed-scalar", ["mezo-header", "mezo-scalars", "mezo-seeds"]),
    ("int4", ["#int4", "#int4-scale", "#tensors"]),  # edge.upload = "int4": its own codec
])
def test_the_edge_client_app_trains_with_torch_unavailable(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path, edge_codec: str,
    arrays: list[str]
) -> None:
    """The ClientApp's train handler for an edge node, in a process where torch cannot be
    imported: it trains on the ONNX export and uploads seeds and scalars (or, with a lossy
    edge codec, its dense delta compressed, still without torch)."""
    from simulations.runner import check_inputs, flower_run_config

    inputs = check_inputs(_config(tiny_model_dir, secagg=False), mini_cache)
    flat = flower_run_config(inputs, tmp_path)
    adapter_file = tmp_path / "adapter.npz"
    from client.edge_trainer import EdgeMeZOTrainer

    trainer = EdgeMeZOTrainer.from_export(inputs.edge_export, inputs.config.lora)  # type: ignore[arg-type]
    np.savez(adapter_file, **{k: np.zeros(s, np.float32) if "lora_B" in k else
                              np.full(s, 0.01, np.float32)
                              for k, s in trainer.model.adapter_shapes.items()})
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import json, numpy as np
        from flwr.app import ConfigRecord, Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        from client.app import make_client_app
        from protocols.codecs import from_record, to_record
        flat = json.loads({json.dumps(json.dumps(flat))})
        adapter = dict(np.load({str(adapter_file)!r}))
        config = ConfigRecord({{"server-round": 1, "local-steps": 3, "batch-size": 2,
            "learning-rate": 0.01, "seq-len": 16, "seed": 0, "codec": "fp32",
            "edge-local-steps": 4, "edge-learning-rate": 0.3, "edge-codec": {edge_codec!r}}})
        msg = Message(RecordDict({{"arrays": to_record(adapter), "config": config}}),
                      dst_node_id=5, message_type="train")
        ctx = Context(run_id=1, node_id=5, node_config={{"partition-id": 0}},
                      state=RecordDict(), run_config={{}})
        reply = make_client_app(flat)(msg, ctx)
        assert not reply.has_error(), reply.error
        from protocols.packing import unpack_record
        print(json.dumps({{"arrays": sorted(unpack_record(reply.content["arrays"]).keys()),
                           "metrics": dict(reply.content["metrics"]),
                           "torch": "torch" in sys.modules}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["arrays"] == arrays
    assert out["metrics"]["edge-client"] == 1.0 and out["metrics"]["upload-bytes"] <= 1024


# (prompt on the edge runs in tests/simulations/test_bench_smoke.py::test_edge_levers)
# (the components subspace is replayed in tests/server/test_strategy.py and the client tests)
@pytest.mark.parametrize(("kind", "subspace"), [("lora", "trajectory"), ("ia3", "full")])
def test_edge_levers_and_small_adapters_train_one_adapter_from_seeds(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path, kind: str, subspace: str
) -> None:
    """The edge levers on the real engine: edge devices send seeds and scalars (under 1 KB)
    along the coordinator's last step of LoRA (the 'trajectory' subspace: the step travels
    with the instruction; round 2 has one) or over a prompt or (IA)3 adapter exported as
    graph inputs; the coordinator replays them (nothing rejected) and adds their mean to
    the torch mean (edge.combine = 'add'); training seconds are logged per kind; the
    round's edge devices score its aggregated step at several multiples (edge.line_search)."""
    from simulations.runner import check_inputs, run_federated

    nested = _config(tiny_model_dir, secagg=False).to_nested()
    nested["lora"].update({"kind": kind, "virtual_tokens": 4})
    # (along the trajectory a larger ε: Δ of a tiny model's first round is small, and
    # the one-dimensional two-point estimate has no variance to fear from it)
    nested["edge"].update({"combine": "add", "subspace": subspace,
                           "epsilon": 0.5 if subspace == "trajectory" else 0.01,
                           "line_search": [0, 0.5, 1, 2, 4]})
    inputs = check_inputs(RunConfig.from_nested(nested), mini_cache)
    assert inputs.edge_export is not None
    if kind != "lora":  # each kind has its own export folder
        assert f"-{kind}-" in inputs.edge_export.name
    run_dir = run_federated(inputs, tmp_path / "runs", name=f"levers-{kind}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["rejected"] == 0 and row["failed"] == 0
        assert row["clients_by_kind"] == {"edge": 2, "torch": 2}
        assert row["bytes_up_by_kind"]["edge"] / 2 <= 1024
        assert set(row["train_s_by_kind"]) == {"edge", "torch"}
        assert all(s > 0 for s in row["train_s_by_kind"].values())
    assert all(np.isfinite(r["perplexity"]) for r in rows)
    # the round's two edge devices scored its aggregated step; the coordinator applied
    # the multiple of theirs with the lowest summed loss
    assert [r["line_search_judges"] for r in rows[1:]] == [2, 2]
    assert all(r["line_search_multiple"] in (0, 0.5, 1, 2, 4) for r in rows[1:])
    if subspace == "trajectory":  # no step before round 1; round 2 searches along round 1's
        assert rows[1]["edge_along_last_step"] == [0.0, 0.0]
        assert len(rows[2]["edge_along_last_step"]) == 2
        assert any(s != 0 for s in rows[2]["edge_along_last_step"])
