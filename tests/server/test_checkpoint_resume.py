"""A coordinator killed mid-run resumes at the last completed round: nothing lost, nothing
counted twice (rounds, metrics rows, privacy ledger).

The real ServerApp logic (:func:`server.app.run_coordinator`) and the real ClientApp, with
secure aggregation and distributed DP on (the defaults plus ``client_dp``), delivered
in-process by a :class:`LoopbackGrid` whose "network" dies when round 3 is sent out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from protocols.privacy.ledger import load_ledger, save_ledger
from protocols.run_config import RunConfig
from server.checkpoint import CheckpointError, load_checkpoint
from simulations.loopback_grid import LoopbackGrid


class CoordinatorKilled(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


class DyingGrid(LoopbackGrid):
    def __init__(self, *args: Any, die_at_train: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.die_at_train = die_at_train
        self.trains = 0

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.trains == self.die_at_train:
                raise CoordinatorKilled()
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture(autouse=True)
def server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture()
def flat(tiny_model_dir: Path, mini_cache: Path, tmp_path: Path) -> dict[str, Any]:
    from simulations.runner import check_inputs, flower_run_config

    config = RunConfig.from_nested({
        "model": {"source": str(tiny_model_dir)},
        "data": {"min_examples": 5, "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"rounds": 3, "clients_per_round": 3, "local_steps": 2, "batch_size": 2,
                  "seq_len": 16, "learning_rate": 0.01},
        "eval": {"max_blocks": 4, "batch_size": 4},
        # a fixed-size sample: the test counts the rounds' clients
        "privacy": {"client_dp": True, "clip_norm": 0.05, "noise_multiplier": 0.5,
                    "client_sampling": "fixed"},
    })
    inputs = check_inputs(config, mini_cache)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return flower_run_config(inputs, run_dir)


def _grid(flat: dict[str, Any], **kwargs: Any) -> LoopbackGrid:
    from client.app import make_client_app

    nodes = [101, 202, 303, 404]
    cls = DyingGrid if kwargs else LoopbackGrid
    return cls(make_client_app(flat), nodes,
               node_config={n: {"partition-id": i} for i, n in enumerate(nodes)}, **kwargs)


def _rounds(run_dir: Path) -> list[int]:
    return [json.loads(line)["round"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_coordinator_resumes_at_the_last_completed_round(flat: dict[str, Any]) -> None:
    from server.app import run_coordinator

    run_dir = Path(flat["paths.run_dir"])
    with pytest.raises(CoordinatorKilled):
        run_coordinator(_grid(flat, die_at_train=3), flat)  # type: ignore[arg-type]
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and (ckpt.round, ckpt.completed) == (2, 2)
    assert _rounds(run_dir) == [0, 1, 2]
    assert [e.round for e in load_ledger(run_dir / "privacy_ledger.json").history] == [1, 2]
    assert not (run_dir / "adapter").exists()

    summary = run_coordinator(_grid(flat), flat)  # type: ignore[arg-type]
    assert _rounds(run_dir) == [0, 1, 2, 3]
    assert [e.round for e in load_ledger(run_dir / "privacy_ledger.json").history] == [1, 2, 3]
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and (ckpt.round, ckpt.completed) == (3, 3)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["epsilon"] > 0

    # a third start has nothing left to do and changes nothing
    run_coordinator(_grid(flat), flat)  # type: ignore[arg-type]
    assert _rounds(run_dir) == [0, 1, 2, 3]
    assert len(load_ledger(run_dir / "privacy_ledger.json").history) == 3


def test_a_round_spent_but_not_checkpointed_is_rerun_under_a_new_number(
    flat: dict[str, Any]
) -> None:
    """Killed after round 3's noisy aggregate was recorded in the ledger but before its
    checkpoint: the ε stays spent, and the re-run round is round 4, not a second round 3."""
    from server.app import run_coordinator

    run_dir = Path(flat["paths.run_dir"])
    with pytest.raises(CoordinatorKilled):
        run_coordinator(_grid(flat, die_at_train=3), flat)  # type: ignore[arg-type]
    ledger_path = run_dir / "privacy_ledger.json"
    ledger = load_ledger(ledger_path)
    spent = ledger.history[-1]
    ledger.record(3, noise_multiplier=spent.noise_multiplier, sample_rate=spent.sample_rate)
    save_ledger(ledger_path, ledger)

    run_coordinator(_grid(flat), flat)  # type: ignore[arg-type]
    assert _rounds(run_dir) == [0, 1, 2, 4]
    assert [e.round for e in load_ledger(ledger_path).history] == [1, 2, 3, 4]
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and (ckpt.round, ckpt.completed) == (4, 3)


def test_a_ledger_kept_with_another_accountant_is_not_resumed(flat: dict[str, Any]) -> None:
    """The saved ledger's accountant would account the rounds to come: a resume whose config
    names another (e.g. Skellam rounds, which only 'rdp-general' covers) is refused, and the
    ledger is left as it was."""
    from protocols.run_config import ConfigError
    from server.app import run_coordinator

    run_dir = Path(flat["paths.run_dir"])
    with pytest.raises(CoordinatorKilled):
        run_coordinator(_grid(flat, die_at_train=2), flat)  # type: ignore[arg-type]
    ledger_path = run_dir / "privacy_ledger.json"
    ledger = load_ledger(ledger_path)
    save_ledger(ledger_path, type(ledger)(accountant="pld", delta=ledger.delta,
                                          history=ledger.history))
    kept = ledger_path.read_text()
    with pytest.raises(ConfigError, match=r"kept with accountant 'pld', but the run's config "
                                          r"says privacy\.accountant = 'rdp'"):
        run_coordinator(_grid(flat), flat)  # type: ignore[arg-type]
    assert ledger_path.read_text() == kept


def test_a_corrupt_checkpoint_is_refused_with_a_clear_error(flat: dict[str, Any]) -> None:
    run_dir = Path(flat["paths.run_dir"])
    (run_dir / "checkpoint.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(run_dir)
