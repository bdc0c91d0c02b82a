"""The signed roster and the identity signatures of authenticated secure aggregation."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.manifest import public_key_bytes
from protocols.secagg.identity import (
    Roster,
    RosterError,
    SignedRoster,
    advert_message,
    consistency_message,
    identity_public_key,
    verify_signature,
)

CREATED = "2026-12-02T00:00:00+00:00"


def _roster(n: int = 3) -> tuple[Roster, list[Ed25519PrivateKey]]:
    keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    return Roster.of({f"device-{i}": identity_public_key(k) for i, k in enumerate(keys)},
                     created=CREATED), keys


def test_a_signed_roster_verifies_only_with_the_organisation_key() -> None:
    roster, _ = _roster()
    org = Ed25519PrivateKey.generate()
    text = SignedRoster.sign(roster, org).to_text()
    back = SignedRoster.from_text(text).verify(public_key_bytes(org.public_key()))
    assert back == roster and len(back.keys) == 3
    assert back.name_of(roster.members[1][1]) == "device-1"

    coordinator = Ed25519PrivateKey.generate()  # signs a roster of its own choosing
    with pytest.raises(RosterError, match="not signed by the organisation key"):
        SignedRoster.from_text(text).verify(public_key_bytes(coordinator.public_key()))
    forged = SignedRoster.sign(roster, coordinator).to_text()
    with pytest.raises(RosterError, match="not signed by the organisation key"):
        SignedRoster.from_text(forged).verify(public_key_bytes(org.public_key()))


def test_a_roster_with_one_member_changed_no_longer_verifies() -> None:
    roster, _ = _roster()
    org = Ed25519PrivateKey.generate()
    doc = json.loads(SignedRoster.sign(roster, org).to_text())
    inner = json.loads(doc["roster"])
    inner["members"][0]["identity_key"] = "ab" * 32  # the coordinator's own key
    doc["roster"] = json.dumps(inner, sort_keys=True, separators=(",", ":"))
    tampered = SignedRoster.from_text(json.dumps(doc))  # well formed ...
    with pytest.raises(RosterError, match="not signed"):  # ... but not the signed one
        tampered.verify(public_key_bytes(org.public_key()))


def test_the_roster_carries_the_organisations_floor_on_round_size() -> None:
    roster, _ = _roster(5)
    assert roster.min_nodes == 3  # the default
    org = Ed25519PrivateKey.generate()
    strict = Roster.of(dict(roster.members), created=CREATED, min_nodes=5)
    back = SignedRoster.from_text(SignedRoster.sign(strict, org).to_text())
    assert back.verify(public_key_bytes(org.public_key())).min_nodes == 5
    for bad in (1, 6, True):
        with pytest.raises(RosterError, match="min_nodes"):
            Roster.of(dict(roster.members), created=CREATED, min_nodes=bad)


@pytest.mark.parametrize(("members", "match"), [
    ({"a": b"k" * 32}, "at least two devices"),
    ({"a": b"k" * 32, "b": b"k" * 32}, "listed twice"),
    ({"a": b"k" * 32, "b c": b"j" * 32}, "device name"),
    ({"a": b"k" * 32, "b": b"short"}, "32 raw bytes"),
])
def test_malformed_rosters_are_refused_with_the_reason(members: dict[str, bytes],
                                                       match: str) -> None:
    with pytest.raises(RosterError, match=match):
        Roster.of(members, created=CREATED)


@pytest.mark.parametrize(("text", "match"), [
    ("not json", "not JSON"),
    ('{"format": "x", "roster": "", "signature": ""}', "format"),
    ('{"format": "fedtune-signed-roster/1", "roster": "{}", "signature": "00"}', "signature"),
])
def test_malformed_signed_rosters_are_refused(text: str, match: str) -> None:
    with pytest.raises(RosterError, match=match):
        SignedRoster.from_text(text)


def test_signatures_are_bound_to_round_node_and_purpose() -> None:
    key = Ed25519PrivateKey.generate()
    pk = identity_public_key(key)
    base = {"round_id": 1000, "salt": b"s" * 16, "threshold": 3, "num_nodes": 4, "node_id": 7,
            "seal_pk": b"a" * 32, "mask_pk": b"b" * 32}
    advert = advert_message(**base)
    sig = key.sign(advert)
    assert verify_signature(pk, sig, advert)
    for change in ({"round_id": 1001},  # replayed into the next round
                   {"node_id": 8},  # moved to another node
                   {"seal_pk": b"c" * 32},  # a substituted key
                   {"threshold": 2, "num_nodes": 2}):  # shown to a device told another round
        assert not verify_signature(pk, sig, advert_message(**(base | change)))
    told = {"round_id": 1000, "salt": b"s" * 16, "threshold": 3, "num_nodes": 4}
    survivors = consistency_message(**told, survivors=[3, 1, 2])
    assert survivors == consistency_message(**told, survivors=[1, 2, 3])
    assert not verify_signature(pk, key.sign(survivors),
                                consistency_message(**told, survivors=[1, 2]))
    assert not verify_signature(pk, key.sign(survivors), consistency_message(
        **(told | {"threshold": 2}), survivors=[1, 2, 3]))
    assert not verify_signature(pk, b"\0" * 64, advert)
    assert not verify_signature(b"short", sig, advert)
