"""The ε ledger: plain data recording every noisy round, saved atomically as tagged JSON.

The coordinator records one entry per round in which it released a noised aggregate and asks
the ledger, before the next round, whether that round would exceed the budget. The history is
the whole state (like Opacus's accountant ``history``), so a restarted coordinator that loads
the ledger and replays a round it already recorded is refused instead of counting it twice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols import __version__
from protocols.atomic_write import write_text_atomic
from protocols.privacy.accounting import (
    check_delta,
    check_step,
    epsilon_for_history,
    get_accountant,
)

#: The tag every saved ledger carries; a ledger of another mechanism is refused on load.
MECHANISM = "subsampled-gaussian"
FORMAT_VERSION = 1
_KEYS = ("mechanism", "format_version", "fedtune_version", "accountant", "delta", "history")
_ENTRY_KEYS = ("round", "noise_multiplier", "sample_rate", "steps")


class LedgerFormatError(ValueError):
    """A saved ledger that cannot be trusted: wrong tag or version, missing key, bad value."""


@dataclass(frozen=True)
class LedgerEntry:
    """One released round: ``steps`` steps of the subsampled Gaussian mechanism."""

    round: int = field(metadata={"help": "server round that released the noised aggregate"})
    noise_multiplier: float = field(metadata={"help": "noise std / clipping norm (σ)"})
    sample_rate: float = field(metadata={"help": "clients_per_round / num_clients (q)"})
    steps: int = field(default=1, metadata={"help": "mechanism steps; 1 per federated round"})

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"round = {self.round!r}: must be an int >= 0")
        check_step(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps
        )

    def as_tuple(self) -> tuple[float, float, int]:
        """The accountant's ``(noise_multiplier, sample_rate, steps)`` form."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class PrivacyLedger:
    """Every noisy round so far, at most one entry per round, and the ε they add up to."""

    accountant: str = field(metadata={"help": "accountant name, see accounting.ACCOUNTANTS"})
    delta: float = field(metadata={"help": "δ of the reported (ε, δ) guarantee"})
    history: list[LedgerEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        get_accountant(self.accountant)
        check_delta(self.delta)
        seen: set[int] = set()
        for entry in self.history:
            if entry.round in seen:
                raise ValueError(f"round {entry.round} appears twice in the ledger history")
            seen.add(entry.round)

    def record(
        self, round: int, *, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> LedgerEntry:
        """Add the round just released; a round already recorded is refused (no double count)."""
        entry = LedgerEntry(round, noise_multiplier, sample_rate, steps)
        if any(e.round == round for e in self.history):
            raise ValueError(
                f"round {round} is already recorded in the privacy ledger; refusing to count it "
                "twice (a replayed round after a restart?)"
            )
        self.history.append(entry)
        return entry

    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ."""
        return epsilon_for_history(
            [e.as_tuple() for e in self.history], delta=self.delta, accountant=self.accountant
        )

    def would_exceed(
        self, budget: float, *, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> bool:
        """Whether recording one more such round would take ε above ``budget``: ask before the
        round runs, and stop cleanly when it would."""
        if math.isnan(budget) or budget <= 0:
            raise ValueError(f"budget = {budget!r}: must be > 0")
        check_step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        history = [e.as_tuple() for e in self.history]
        history.append((noise_multiplier, sample_rate, steps))
        return epsilon_for_history(history, delta=self.delta, accountant=self.accountant) > budget

    def to_json(self) -> str:
        return json.dumps(
            {
                "mechanism": MECHANISM,
                "format_version": FORMAT_VERSION,
                "fedtune_version": __version__,
                "accountant": self.accountant,
                "delta": self.delta,
                "history": [
                    {key: getattr(entry, key) for key in _ENTRY_KEYS} for entry in self.history
                ],
            },
            indent=2,
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Rebuild a saved ledger, refusing another mechanism, format version or bad values."""
        try:
            raw = json.loads(text, parse_constant=_refuse_constant)
        except ValueError as err:
            raise LedgerFormatError(f"privacy ledger is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise LedgerFormatError(f"privacy ledger must be a JSON object, got {_kind(raw)}")
        if raw.get("mechanism") != MECHANISM:
            raise LedgerFormatError(
                f"mechanism = {raw.get('mechanism')!r}: expected {MECHANISM!r}; this file is "
                "not a ledger of the subsampled Gaussian mechanism"
            )
        if raw.get("format_version") != FORMAT_VERSION:
            raise LedgerFormatError(
                f"format_version = {raw.get('format_version')!r}: this fedtune reads "
                f"version {FORMAT_VERSION}"
            )
        _check_keys(raw, _KEYS, "privacy ledger")
        _typed(raw, "fedtune_version", str, "fedtune_version")
        entries = _typed(raw, "history", list, "history")
        try:
            history = []
            for i, item in enumerate(entries):
                where = f"history[{i}]"
                if not isinstance(item, dict):
                    raise LedgerFormatError(f"{where}: expected an object, got {_kind(item)}")
                _check_keys(item, _ENTRY_KEYS, where)
                history.append(LedgerEntry(
                    round=_typed(item, "round", int, f"{where}.round"),
                    noise_multiplier=_number(item, "noise_multiplier", where),
                    sample_rate=_number(item, "sample_rate", where),
                    steps=_typed(item, "steps", int, f"{where}.steps"),
                ))
            return cls(
                accountant=_typed(raw, "accountant", str, "accountant"),
                delta=_number(raw, "delta", ""),
                history=history,
            )
        except LedgerFormatError:
            raise
        except ValueError as err:
            raise LedgerFormatError(f"privacy ledger: {err}") from err


def save_ledger(path: str | os.PathLike[str], ledger: PrivacyLedger) -> None:
    """Write ``ledger`` to ``path`` atomically (owner-only, 0o600): a crash leaves the old
    file or the new one."""
    write_text_atomic(path, ledger.to_json(), mode=0o600)


def load_ledger(path: str | os.PathLike[str]) -> PrivacyLedger:
    """Read a ledger written by :func:`save_ledger`; errors name the file."""
    try:
        return PrivacyLedger.from_json(Path(path).read_text(encoding="utf-8"))
    except LedgerFormatError as err:
        raise LedgerFormatError(f"{path}: {err}") from err


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number in a privacy ledger")


def _kind(value: object) -> str:
    return type(value).__name__


def _check_keys(raw: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in raw]
    unknown = sorted(set(raw) - set(keys))
    if missing or unknown:
        raise LedgerFormatError(
            f"{where}: missing key(s) {missing}, unknown key(s) {unknown}; expected {list(keys)}"
        )


def _typed(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__
        raise LedgerFormatError(f"{where} = {value!r}: expected {expected}, got {_kind(value)}")
    return value


def _number(raw: dict[str, Any], key: str, where: str) -> float:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        name = f"{where}.{key}" if where else key
        raise LedgerFormatError(f"{name} = {value!r}: expected float, got {_kind(value)}")
    return float(value)
