"""``flwr run .``: the repository is a Flower App that runs on Flower's own launcher (a local
SuperLink in simulation mode), with every key of the schema as its run config."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from protocols.run_config import ConfigError, RunConfig
from simulations.default_config import flwr_app_toml
from simulations.flower_app import check_nodes

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_names_the_app_with_every_default() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert flwr_app_toml() in text, "regenerate with `fedtune config --flwr-app`"
    app = tomllib.loads(text)["tool"]["flwr"]["app"]
    config = app["config"]
    assert {k: v for k, v in config.items() if not k.startswith("paths.")} == \
        RunConfig().to_flat()
    assert RunConfig.from_flat(config) == RunConfig()
    assert app["components"] == {"serverapp": "simulations.flower_app:server_app",
                                 "clientapp": "simulations.flower_app:client_app"}


def test_flower_accepts_the_app_and_bundles_only_fedtune_code() -> None:
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, warnings = load_and_validate(ROOT / "pyproject.toml")
    assert config and not warnings
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    packages = {n.split("/", 1)[0] for n in names if "/" in n}
    assert packages == {"protocols", "kernels", "client", "server", "simulations", ".info"}
    assert "simulations/flower_app.py" in names and "client/app.py" in names
    assert not [n for n in names if n.startswith("tests/") or "test_" in n]


def test_more_supernodes_than_devices_or_fewer_than_a_round_are_refused() -> None:
    check_nodes(2, 10, 2)  # fewer nodes than devices: the first ones take part
    with pytest.raises(ConfigError, match="num-supernodes=4"):
        check_nodes(5, 4, 2)
    with pytest.raises(ConfigError, match=r"train\.clients_per_round"):
        check_nodes(2, 4, 3)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _processes_of(flwr_home: Path) -> list[int]:
    """Processes started under this FLWR_HOME (the detached local SuperLink and its tree)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


@pytest.mark.slow
def test_flwr_run_from_the_repository_root(tiny_model_dir: Path, mini_cache: Path,
                                           tmp_path: Path) -> None:
    from flwr.cli.constant import LOCAL_SUPERLINK_HTTP_API_PORT

    if _port_open(int(LOCAL_SUPERLINK_HTTP_API_PORT)):
        pytest.fail(f"a local Flower SuperLink already serves port {LOCAL_SUPERLINK_HTTP_API_PORT}"
                    "; this test starts its own (stop the other one)")
    bin_dir = Path(sys.executable).parent
    flwr_home, work = tmp_path / "flwr-home", tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FEDTUNE_CACHE": str(mini_cache),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           # the test's environment has every dependency; no per-run `uv sync` (offline)
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    overrides = " ".join([
        f"model.source='{tiny_model_dir}'", "data.min_examples=5", "data.heldout_fraction=0.25",
        "lora.r=4", "train.rounds=2", "train.local_steps=2", "train.batch_size=2",
        "train.seq_len=16", "eval.max_blocks=4", "eval.batch_size=4", "eval.generate=0"])
    try:
        done = subprocess.run([str(bin_dir / "flwr"), "run", str(ROOT), "--stream",
                               "-c", overrides], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        _stop(_processes_of(flwr_home))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    runs = list((work / "runs").glob("flwr-*"))
    assert len(runs) == 1 and not runs[0].name.endswith((".partial", ".failed")), output[-4000:]
    run_dir = runs[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients"] == 2 and r["failed"] == 0 for r in rows[1:])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "report.html").is_file()
    assert "flwr run: round 2/2: 2 clients, 0 failed" in output
    assert f"run folder {run_dir}" in output
    assert not list((mini_cache / "flwr-runs").glob("*.json"))  # the hand-off is removed
