"""Update and metric validation: a table of good and BAD replies, each with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.adapter_spec import AdapterSpec
from protocols.errors import InvalidUpdate
from protocols.validation import validate_metrics, validate_update

A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


@pytest.fixture()
def spec() -> AdapterSpec:
    arrays = {A: np.zeros((4, 16), np.float32), B: np.zeros((16, 4), np.float32)}
    return AdapterSpec.from_arrays(arrays, {"r": 4})


def good() -> dict[str, np.ndarray]:
    return {A: np.ones((4, 16), np.float32), B: np.ones((16, 4), np.float32)}


def test_good_update_passes(spec: AdapterSpec) -> None:
    validate_update(good(), spec)


def _with(**changes: object) -> dict[str, np.ndarray]:
    tensors = good()
    for key, value in changes.items():
        name = A if key == "a" else B
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value  # type: ignore[assignment]
    return tensors


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        (_with(b=None), f"missing keys `{B}`"),
        ({**good(), "extra": np.ones(1, np.float32)}, "unexpected keys `extra`"),
        (_with(b=np.ones((16, 8), np.float32)), f"`{B}`: expected shape (16, 4), got (16, 8)"),
        (_with(a=np.ones((4, 16), np.float64)), f"`{A}`: expected dtype float32, got float64"),
        (_with(a=np.full((4, 16), np.nan, np.float32)), f"`{A}`: contains NaN or Inf"),
        (_with(b=np.full((16, 4), np.inf, np.float32)), f"`{B}`: contains NaN or Inf"),
    ],
)
def test_bad_updates_are_rejected_with_reason(
    spec: AdapterSpec, tensors: dict[str, np.ndarray], reason: str
) -> None:
    with pytest.raises(InvalidUpdate) as err:
        validate_update(tensors, spec)
    assert err.value.reason == reason


def test_frozen_tensors_must_not_be_uploaded() -> None:
    arrays = {A: np.zeros((4, 16), np.float32), B: np.zeros((16, 4), np.float32)}
    ffa = AdapterSpec.from_arrays(arrays, {}, frozen=frozenset({A}))
    validate_update({B: np.ones((16, 4), np.float32)}, ffa)
    with pytest.raises(InvalidUpdate, match="unexpected keys"):
        validate_update(good(), ffa)


def test_metrics_good() -> None:
    assert validate_metrics({"num-examples": 12, "train-loss": 1.5}) == 12


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"train-loss": 1.0}, "metric `num-examples` is missing"),
        ({"num-examples": 0}, "metric `num-examples`: expected a positive integer, got 0"),
        ({"num-examples": 2.5}, "metric `num-examples`: expected a positive integer, got 2.5"),
        ({"num-examples": 3, "secret": 1.0}, "unexpected metric keys `secret`"),
        ({"num-examples": 3, "train-loss": float("nan")}, "metric `train-loss`: not finite (nan)"),
        (
            {"num-examples": 3, "train-loss": "hello"},
            "metric `train-loss`: expected a number, got str",
        ),
    ],
)
def test_bad_metrics_are_rejected(metrics: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidUpdate) as err:
        validate_metrics(metrics)
    assert err.value.reason == reason


def test_spec_json_round_trip(spec: AdapterSpec) -> None:
    again = AdapterSpec.from_json(spec.to_json())
    assert again == spec
    assert again.nbytes == (4 * 16 + 16 * 4) * 4


@pytest.mark.parametrize(("metrics", "reason"), [
    ({}, "expected 1 .* or 0"),
    ({"edge-client": 0.5}, "got 0.5"),
    ({"edge-client": True}, "got True"),
    ({"edge-client": "1"}, "got '1'"),
    ({"edge-client": 1.0, "train-loss": 2.0}, "unexpected metric keys `train-loss`"),
])
def test_a_kind_reply_is_one_flag_and_nothing_else(metrics: dict[str, object],
                                                  reason: str) -> None:
    from protocols.validation import validate_kind_reply

    assert validate_kind_reply({"edge-client": 1.0}) is True
    assert validate_kind_reply({"edge-client": 0}) is False
    with pytest.raises(InvalidUpdate, match=reason):
        validate_kind_reply(metrics)
