"""The ε ledger: composition, no double counting, budget checks, tagged JSON, atomic save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocols.privacy.accounting import epsilon_for_history
from protocols.privacy.ledger import (
    FORMAT_VERSION,
    MECHANISM,
    LedgerEntry,
    LedgerFormatError,
    PrivacyLedger,
    load_ledger,
    save_ledger,
)

DELTA = 1e-5
# Ten clients of a hundred per round at σ = 2, then twenty per round at σ = 3.
ROUNDS = [(r, 2.0, 0.1) for r in range(1, 6)] + [(r, 3.0, 0.2) for r in range(6, 9)]


def filled(
    accountant: str = "rdp", rounds: list[tuple[int, float, float]] = ROUNDS
) -> PrivacyLedger:
    ledger = PrivacyLedger(accountant=accountant, delta=DELTA)
    for rnd, sigma, q in rounds:
        ledger.record(rnd, noise_multiplier=sigma, sample_rate=q)
    return ledger


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_composition_of_history(accountant: str) -> None:
    ledger = filled(accountant)
    expected = epsilon_for_history(
        [(sigma, q, 1) for _, sigma, q in ROUNDS], delta=DELTA, accountant=accountant
    )
    assert ledger.epsilon() == expected
    assert PrivacyLedger(accountant=accountant, delta=DELTA).epsilon() == 0.0


def test_recording_a_round_twice_is_refused() -> None:
    ledger = filled()
    before = ledger.epsilon()
    with pytest.raises(ValueError, match="round 3 is already recorded in the privacy ledger"):
        ledger.record(3, noise_multiplier=2.0, sample_rate=0.1)
    assert len(ledger.history) == len(ROUNDS) and ledger.epsilon() == before


def test_json_round_trip_is_equal_and_tagged() -> None:
    ledger = filled()
    text = ledger.to_json()
    raw = json.loads(text)
    assert raw["mechanism"] == MECHANISM == "subsampled-gaussian"
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["history"][0] == {"round": 1, "noise_multiplier": 2.0, "sample_rate": 0.1,
                                 "steps": 1}
    assert PrivacyLedger.from_json(text) == ledger


def test_restart_from_saved_ledger_matches_uninterrupted_run(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    uninterrupted = filled()
    save_ledger(path, filled(rounds=ROUNDS[:-1]))
    # the coordinator crashes after saving round 7 and restarts
    resumed = load_ledger(path)
    with pytest.raises(ValueError, match="round 7 is already recorded"):
        resumed.record(7, noise_multiplier=3.0, sample_rate=0.2)  # replay after restart
    resumed.record(8, noise_multiplier=3.0, sample_rate=0.2)
    assert resumed == uninterrupted
    assert resumed.epsilon() == uninterrupted.epsilon()
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temporary file left


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    save_ledger(path, filled(rounds=ROUNDS[:2]))
    save_ledger(path, filled())
    assert load_ledger(path) == filled()


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_would_exceed_exactly_when_next_round_crosses_budget(accountant: str) -> None:
    ledger = filled(accountant, rounds=ROUNDS[:3])
    now = ledger.epsilon()
    step: dict[str, Any] = {"noise_multiplier": 2.0, "sample_rate": 0.1}
    after = epsilon_for_history(
        [e.as_tuple() for e in ledger.history] + [(2.0, 0.1, 1)], delta=DELTA,
        accountant=accountant,
    )
    assert now < after
    assert ledger.would_exceed((now + after) / 2, **step)
    assert not ledger.would_exceed(after, **step)  # reaching the budget exactly is allowed
    assert not ledger.would_exceed(after * 1.01, **step)
    assert ledger.would_exceed(after * 0.99, **step)
    assert ledger.epsilon() == now  # asking records nothing


def test_training_stops_before_the_budget() -> None:
    budget = 3.0
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA)
    rnd = 0
    while not ledger.would_exceed(budget, noise_multiplier=1.0, sample_rate=0.1):
        rnd += 1
        ledger.record(rnd, noise_multiplier=1.0, sample_rate=0.1)
    assert rnd > 0 and ledger.epsilon() <= budget
    nxt = [*(e.as_tuple() for e in ledger.history), (1.0, 0.1, 1)]
    assert epsilon_for_history(nxt, delta=DELTA, accountant="rdp") > budget


def good_raw() -> dict[str, object]:
    return json.loads(filled(rounds=ROUNDS[:2]).to_json())  # type: ignore[no-any-return]


def edited(**changes: object) -> str:
    raw = good_raw()
    raw.update(changes)
    return json.dumps(raw)


def edited_entry(**changes: object) -> str:
    raw = good_raw()
    raw["history"][1].update(changes)  # type: ignore[index]
    return json.dumps(raw)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (edited(mechanism="laplace"),
         r"mechanism = 'laplace': expected 'subsampled-gaussian'; this file is not a ledger"),
        (edited(mechanism=None), r"mechanism = None: expected 'subsampled-gaussian'"),
        (edited(format_version=2), r"format_version = 2: this fedtune reads version 1"),
        (edited(accountant="prv"), r"unknown accountant 'prv'; valid accountants: \['pld', "),
        (edited(delta=2), r"delta = 2.0: must be in \(0, 1\)"),
        (edited(delta="1e-5"), r"delta = '1e-5': expected float, got str"),
        (edited(extra=1), r"unknown key\(s\) \['extra'\]"),
        (edited(history={}), r"history = \{\}: expected list, got dict"),
        (edited_entry(steps=1.0), r"history\[1\].steps = 1.0: expected int, got float"),
        (edited_entry(round=True), r"history\[1\].round = True: expected int, got bool"),
        (edited_entry(round=1), r"round 1 appears twice in the ledger history"),
        (edited_entry(sample_rate=1.5), r"sample_rate = 1.5: must be in \[0, 1\]"),
        (edited_entry(noise_multiplier=-1), r"noise_multiplier = -1.0: must be finite and >= 0"),
        ('{"mechanism": "subsampled-gaussian", "delta": NaN}', r"NaN is not a valid number"),
        ("[1, 2]", r"privacy ledger must be a JSON object, got list"),
        ("{not json", r"privacy ledger is not valid JSON"),
    ],
)
def test_bad_json_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(LedgerFormatError, match=message):
        PrivacyLedger.from_json(text)


def test_missing_key_is_named() -> None:
    raw = good_raw()
    del raw["delta"]
    with pytest.raises(LedgerFormatError, match=r"missing key\(s\) \['delta'\]"):
        PrivacyLedger.from_json(json.dumps(raw))


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(edited(mechanism="laplace"))
    with pytest.raises(LedgerFormatError, match=r"ledger.json: mechanism = 'laplace'"):
        load_ledger(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accountant": "moments"}, r"unknown accountant 'moments'"),
        ({"delta": 0.0}, r"delta = 0.0: must be in \(0, 1\)"),
    ],
)
def test_bad_ledger_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    params: dict[str, object] = {"accountant": "rdp", "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=message):
        PrivacyLedger(**params)  # type: ignore[arg-type]


def test_bad_entries_are_refused() -> None:
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA)
    with pytest.raises(ValueError, match=r"round = -1: must be an int >= 0"):
        ledger.record(-1, noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match=r"steps = 0.5: must be an int >= 0"):
        LedgerEntry(1, 1.0, 0.1, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"budget = 0.0: must be > 0"):
        ledger.would_exceed(0.0, noise_multiplier=1.0, sample_rate=0.1)
    assert ledger.history == []
