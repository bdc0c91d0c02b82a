"""Who may take part in secure aggregation: device identity keys and the signed roster.

Against a coordinator that lies (Bonawitz et al., CCS 2017, §6, the active-adversary
variant), the key agreement of SecAgg must be authenticated: otherwise the coordinator
substitutes its own public keys for threshold-many peers of a victim (or adds
threshold-many nodes of its own) and receives shares it can open. Here

* each device holds a long-term **Ed25519 identity key** (its private half never leaves the
  device) and signs the round keys it advertises with it (:func:`advert_message`);
* an **organisation key**, kept offline by whoever admits devices and pinned by every
  device, signs the **roster**: the identity public keys allowed in the federation. The
  coordinator relays the roster but cannot forge one, so it can neither impersonate a listed
  device nor invent one (sybils);
* before any share is released, each survivor signs the survivor list it was told
  (:func:`consistency_message`), and a device unmasks only with at least ``t`` valid
  signatures over the very list it signed itself: a coordinator cannot show different
  clients different survivor lists.

The identity key is long-term and used only for these signatures; the round's X25519 keys
stay fresh per round. Canonical bytes carry a domain label, so a signature made for one
purpose never verifies for another.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.manifest import public_key_bytes

ROSTER_FORMAT = "fedtune-roster/1"
SIGNED_ROSTER_FORMAT = "fedtune-signed-roster/1"
SIGNATURE_BYTES = 64
IDENTITY_KEY_BYTES = 32
_ADVERT_LABEL = b"fedtune-secagg-advert/1\x00"
_CONSISTENCY_LABEL = b"fedtune-secagg-consistency/1\x00"
_ROSTER_LABEL = b"fedtune-roster/1\x00"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_HEX = re.compile(r"^[0-9a-f]{64}$")
_SIGNATURE_HEX = re.compile(r"^[0-9a-f]{128}$")


class RosterError(ValueError):
    """A roster that cannot be parsed, or whose signature does not verify."""


@dataclass(frozen=True)
class Roster:
    """The devices admitted to secure aggregation: name -> raw Ed25519 identity key."""

    members: tuple[tuple[str, bytes], ...]
    created: str
    label: str = ""
    #: The fewest devices a round may have (the organisation's floor, not the coordinator's
    #: choice): a coordinator that told a device its round had two nodes, itself and one
    #: colluder, would learn that device's update from their sum.
    min_nodes: int = 3

    def __post_init__(self) -> None:
        names = [name for name, _ in self.members]
        keys = [key for _, key in self.members]
        if len(self.members) < 2:
            raise RosterError("a roster needs at least two devices (secure aggregation sums "
                              "two or more updates)")
        for name, key in self.members:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise RosterError(f"roster: device name {name!r} must be 1-64 letters, digits, "
                                  "'_', '.' or '-'")
            if not isinstance(key, bytes) or len(key) != IDENTITY_KEY_BYTES:
                raise RosterError(f"roster: {name}: identity key must be 32 raw bytes")
        if len(set(names)) != len(names):
            raise RosterError("roster: device names repeat")
        if len(set(keys)) != len(keys):
            raise RosterError("roster: an identity key is listed twice (one device, one key)")
        try:
            datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise RosterError(f"roster: created: expected ISO 8601, got {self.created!r}"
                              ) from None
        if (isinstance(self.min_nodes, bool) or not isinstance(self.min_nodes, int)
                or not 2 <= self.min_nodes <= len(self.members)):
            raise RosterError(f"roster: min_nodes = {self.min_nodes!r}: expected an integer "
                              f"from 2 to the {len(self.members)} devices it lists")
        object.__setattr__(self, "members", tuple(sorted(self.members)))

    @classmethod
    def of(cls, members: dict[str, bytes], *, label: str = "", created: str | None = None,
           min_nodes: int | None = None) -> Roster:
        """``min_nodes`` defaults to 3, or every device when the roster lists only two."""
        stamp = created or datetime.now(UTC).isoformat(timespec="seconds")
        floor = min(3, len(members)) if min_nodes is None else min_nodes
        return cls(tuple(members.items()), stamp, label, floor)

    @property
    def keys(self) -> frozenset[bytes]:
        return frozenset(key for _, key in self.members)

    def name_of(self, key: bytes) -> str | None:
        return next((name for name, k in self.members if k == key), None)

    def canonical_bytes(self) -> bytes:
        """Deterministic UTF-8 JSON (sorted keys, no spaces): what the organisation signs."""
        doc = {"created": self.created, "format": ROSTER_FORMAT, "label": self.label,
               "members": [{"identity_key": key.hex(), "name": name}
                           for name, key in self.members], "min_nodes": self.min_nodes}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedRoster:
    """A roster's canonical bytes and the organisation's signature: the form that travels.
    :meth:`verify` is the one way to the :class:`Roster` a device may trust."""

    roster_bytes: bytes
    signature: bytes

    @classmethod
    def sign(cls, roster: Roster, org_key: Ed25519PrivateKey) -> SignedRoster:
        data = roster.canonical_bytes()
        return cls(data, org_key.sign(_ROSTER_LABEL + data))

    def verify(self, org_public_key: bytes) -> Roster:
        """The roster, only if the organisation key the device pinned signed it."""
        try:
            Ed25519PublicKey.from_public_bytes(org_public_key).verify(
                self.signature, _ROSTER_LABEL + self.roster_bytes)
        except (InvalidSignature, ValueError):
            raise RosterError(
                "the roster of devices is not signed by the organisation key this device "
                "pinned; refusing (a coordinator could otherwise admit keys of its own)"
            ) from None
        return self.unverified()

    def unverified(self) -> Roster:
        """The roster without checking the signature: for the coordinator, which only relays
        it and drops adverts that no listed key signed (the devices check the signature)."""
        try:
            doc = json.loads(self.roster_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RosterError("roster is not JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"created", "format", "label", "members",
                                                     "min_nodes"}:
            raise RosterError("roster: expected keys created, format, label, members, "
                              "min_nodes")
        if doc["format"] != ROSTER_FORMAT:
            raise RosterError(f"roster: format: expected {ROSTER_FORMAT!r}; update fedtune")
        members = doc["members"]
        if not isinstance(members, list) or not all(
                isinstance(m, dict) and set(m) == {"identity_key", "name"}
                and isinstance(m["identity_key"], str) and _KEY_HEX.fullmatch(m["identity_key"])
                for m in members):
            raise RosterError("roster: members must be {name, identity_key: 64 hex digits}")
        if not isinstance(doc["label"], str):
            raise RosterError("roster: label must be a string")
        roster = Roster(tuple((m["name"], bytes.fromhex(m["identity_key"])) for m in members),
                        doc["created"], doc["label"], doc["min_nodes"])
        if roster.canonical_bytes() != self.roster_bytes:
            raise RosterError("roster is not in canonical form; it was not written by fedtune")
        return roster

    def to_text(self) -> str:
        doc = {"format": SIGNED_ROSTER_FORMAT, "roster": self.roster_bytes.decode(),
               "signature": self.signature.hex()}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_text(cls, text: str | bytes) -> SignedRoster:
        """Parse :meth:`to_text`'s output (the form only; :meth:`verify` before trusting)."""
        try:
            doc = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RosterError("signed roster is not JSON; re-fetch it") from None
        if not isinstance(doc, dict) or set(doc) != {"format", "roster", "signature"}:
            raise RosterError("signed roster: expected keys format, roster, signature")
        if doc["format"] != SIGNED_ROSTER_FORMAT:
            raise RosterError(f"signed roster: format: expected {SIGNED_ROSTER_FORMAT!r}; "
                              "update fedtune")
        if not isinstance(doc["roster"], str):
            raise RosterError("signed roster: roster must be a string")
        if not isinstance(doc["signature"], str) or not _SIGNATURE_HEX.fullmatch(
                doc["signature"]):
            raise RosterError("signed roster: signature must be 128 lowercase hex digits")
        signed = cls(doc["roster"].encode(), bytes.fromhex(doc["signature"]))
        signed.unverified()  # a precise error for a malformed roster, before any use
        return signed


def identity_public_key(key: Ed25519PrivateKey) -> bytes:
    return public_key_bytes(key.public_key())


def advert_message(*, round_id: int, salt: bytes, threshold: int, num_nodes: int,
                   node_id: int, seal_pk: bytes, mask_pk: bytes, degree: int = 0) -> bytes:
    """What a device signs when it advertises its round keys: bound to the round (id, the
    coordinator's fresh salt, and the threshold, node count and graph degree it was told)
    and to the node id the keys are for, so an advert cannot be replayed into another round,
    moved to another node, or shown to a device that was told another threshold or another
    graph (SecAgg+ degree; 0 = the complete graph, :mod:`protocols.secagg.graph`)."""
    return (_ADVERT_LABEL
            + struct.pack(">QQQQQ", round_id, threshold, num_nodes, node_id, degree)
            + salt + seal_pk + mask_pk)


def consistency_message(*, round_id: int, salt: bytes, threshold: int, num_nodes: int,
                        survivors: Sequence[int]) -> bytes:
    """What a survivor signs in the consistency round: the sorted survivor list of the
    round it was told, with its threshold and node count. Two different lists (or
    thresholds) for one round never share a signature."""
    ids = sorted(survivors)
    return (_CONSISTENCY_LABEL
            + struct.pack(">QQQQ", round_id, threshold, num_nodes, len(ids)) + salt
            + b"".join(struct.pack(">Q", i) for i in ids))


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
