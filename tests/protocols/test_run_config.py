"""Run config schema: unknown keys and bad values are named; the flat form round-trips."""

from __future__ import annotations

import pytest

from protocols.run_config import ConfigError, RunConfig


def test_defaults_round_trip_through_flat_form() -> None:
    config = RunConfig()
    flat = config.to_flat()
    assert flat["lora.r"] == 8
    assert RunConfig.from_flat({**flat, "paths.run_dir": "/x", "other": 1}) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, r"unknown config section\(s\) \['trian'\]"),
        ({"train": {"round": 3}}, r"unknown key\(s\) \['train.round'\]; valid keys in \[train\]"),
        ({"train": {"rounds": 0}}, r"train.rounds = 0: must be >= 1"),
        ({"train": {"rounds": "3"}}, r"train.rounds = '3': expected int, got str"),
        ({"lora": {"dropout": 1.0}}, r"lora.dropout = 1.0: must be in \[0, 1\)"),
        ({"data": {"heldout_fraction": 0}}, r"data.heldout_fraction = 0.0: must be in \(0, 1\)"),
        ({"eval": {"central": 1}}, r"eval.central = 1: expected bool, got int"),
        ({"lora": {"target_modules": " , "}}, r"lora.target_modules = ' , ': names no module"),
    ],
)
def test_bad_config_is_named(raw: dict[str, dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_nested(raw)


def test_int_is_accepted_for_float() -> None:
    assert RunConfig.from_nested({"lora": {"alpha": 32}}).lora.alpha == 32.0
