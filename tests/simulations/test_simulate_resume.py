"""``fedtune simulate --resume``: a simulation stopped after a round (SIGTERM here, as a
service manager or a closed terminal stops it) continues from its checkpoint and ends with
exactly the adapter and metrics of the run that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
#: Enough rounds that the SIGINT sent after round 1's checkpoint lands mid-run: with three
#: tiny rounds (~1.4 s each) a quiet machine finished the run before the signal took effect.
ROUNDS = 8


def _simulate(cache: Path, runs: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", "simulate", "--no-progress",
            "--cache-dir", str(cache), "--runs-dir", str(runs), *args]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _settings(model_dir: Path) -> list[str]:
    sets = [f"model.source={model_dir}", "data.min_examples=5", "data.heldout_fraction=0.25",
            "lora.r=4", f"train.rounds={ROUNDS}", "train.clients_per_round=2",
            "train.local_steps=2",
            "train.batch_size=2", "train.seq_len=16", "eval.max_blocks=4",
            "eval.batch_size=4"]
    return [item for s in sets for item in ("--set", s)]


def test_a_stopped_simulation_resumes_to_the_uninterrupted_result(
        tiny_model_dir: Path, mini_cache: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from server.checkpoint import load_checkpoint

    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(_simulate(mini_cache, runs, "--name", "whole",
                                     *_settings(tiny_model_dir)),
                           capture_output=True, text=True, env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # pytest-xdist's workers ignore SIGINT, and a child inherits that (then Python installs
    # no KeyboardInterrupt handler, as POSIX asks of a background job): give the run the
    # default disposition a terminal's Ctrl-C meets.
    stopped = subprocess.Popen(_simulate(mini_cache, runs, "--name", "cut",
                                         *_settings(tiny_model_dir)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, preexec_fn=_default_sigint)
    partial = runs / "cut.partial"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        checkpoint = load_checkpoint(partial) if partial.is_dir() else None
        if checkpoint is not None and checkpoint.round >= 1:
            break
        assert stopped.poll() is None, stopped.communicate()[1][-3000:]
        time.sleep(0.2)
    else:
        stopped.kill()
        pytest.fail("no round-1 checkpoint within 300 s")
    signalled_after = checkpoint.round
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 128 + signal.SIGINT, (
        f"SIGINT sent when round {signalled_after} was checkpointed; the run exited "
        f"{stopped.returncode}: {err[-2500:]}")
    assert err.strip().splitlines()[-1].startswith(
        "fedtune simulate: interrupted (SIGINT); an unfinished run folder is kept")
    kept = load_checkpoint(runs / "cut.failed")
    assert kept is not None and 1 <= kept.round < ROUNDS

    resumed = subprocess.run(_simulate(mini_cache, runs, "--resume", "cut"),
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def rows(name: str) -> list[dict[str, float]]:
        return [json.loads(line) for line in
                (runs / name / "metrics.jsonl").read_text().splitlines()]

    assert [r["round"] for r in rows("cut")] == list(range(ROUNDS + 1))  # every round once
    assert [r["perplexity"] for r in rows("cut")] == [r["perplexity"] for r in rows("whole")]
    a = load_file(str(runs / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(runs / "cut" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    info = json.loads((runs / "cut" / "run_info.json").read_text())
    assert len(info["resumed"]) == 1
