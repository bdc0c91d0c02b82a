"""Fuzz: every SecAgg wire parser and the roster parser fail with their own error, never
another one, on whatever a hostile party sends (fields dropped, retyped, resized)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.secagg import wire
from protocols.secagg.identity import RosterError, SignedRoster

KEY, SIG = b"k" * 32, b"s" * 64
VALID: dict[type, RecordDict] = {
    wire.SetupRequest: wire.SetupRequest(3000, b"x" * 16, 3, 4, b'{"a": 1}',
                                         degree=2).to_record(),  # SecAgg+: t = 3 of 3
    wire.KeyAdvert: wire.KeyAdvert(KEY, b"m" * 32, b"i" * 32, SIG).to_record(),
    wire.ShareKeysRequest: wire.ShareKeysRequest(3000, {
        1: wire.KeyAdvert(b"a" * 32, b"b" * 32, b"i" * 32, SIG),
        2: wire.KeyAdvert(b"c" * 32, b"d" * 32, b"j" * 32, SIG)}).to_record(),
    wire.SealedShares: wire.SealedShares({1: b"t" * 90, 2: b"u" * 90}).to_record(),
    wire.ConsistencyRequest: wire.ConsistencyRequest(3000, (1, 2, 3)).to_record(),
    wire.ConsistencySignature: wire.ConsistencySignature(SIG).to_record(),
    wire.UnmaskRequest: wire.UnmaskRequest(3000, (1, 2), (3,), {1: SIG, 2: SIG}).to_record(),
    wire.UnmaskShares: wire.UnmaskShares({1: b"b" * 37}, {3: b"s" * 37}).to_record(),
    wire.MaskingInstruction: RecordDict({wire.RECORD: wire.MaskingInstruction(
        3000, {1: b"c" * 90, 2: b"d" * 90}, modulus_bits=5, scale=350.0, clip_range=0.02,
        levels=7).to_record()}),
}
VALUES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True),
    st.booleans(), st.text(max_size=20), st.binary(max_size=80),
    st.lists(st.binary(max_size=70), max_size=4), st.lists(st.integers(0, 9), max_size=3))


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(VALID, key=lambda k: k.__name__)), data=st.data())
def test_malformed_secagg_messages_raise_only_the_protocol_error(kind: type,
                                                                data: st.DataObject) -> None:
    fields: dict[str, Any] = dict(VALID[kind].config_records[wire.RECORD])
    for name in data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3)):
        if data.draw(st.booleans()):
            fields.pop(name, None)
        else:
            fields[name] = data.draw(VALUES)
    try:
        record = RecordDict({wire.RECORD: ConfigRecord(fields)})
    except (TypeError, ValueError):
        return  # Flower itself refuses to build the record: nothing reaches a parser
    with contextlib.suppress(wire.SecAggProtocolError):
        kind.from_record(record)


@settings(max_examples=300, deadline=None)
@given(bits=st.sampled_from([2, 3, 5, 11, 31, 32, 64]), length=st.integers(0, 40),
       payload=st.one_of(st.binary(max_size=200), st.lists(st.integers(0, 2**32 - 1),
                                                           max_size=40)),
       dtype=st.sampled_from(["uint8", "uint32", "uint64", "int32", "float32"]))
def test_malformed_masked_vectors_raise_only_the_protocol_error(
        bits: int, length: int, payload: bytes | list[int], dtype: str) -> None:
    """Bit-packed masked vectors (small moduli) and native words alike: whatever arrives
    either parses to ``length`` values below ``2**bits`` or is refused by name."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    raw = (np.frombuffer(payload, np.uint8) if isinstance(payload, bytes)
           else np.array(payload, np.uint64))
    with np.errstate(over="ignore"):
        vector = raw.astype(dtype)
    content = RecordDict({wire.MASKED: ArrayRecord({wire.MASKED_VECTOR: Array(vector)})})
    try:
        out = wire.read_masked(content, length=length, modulus_bits=bits)
    except wire.SecAggProtocolError:
        return
    assert out.shape == (length,) and (bits == 64 or int(out.max(initial=0)) < 2**bits)


HEX = "0123456789abcdef"
MEMBERS = st.lists(st.dictionaries(st.sampled_from(["name", "identity_key"]),
                                   st.text(HEX, max_size=64)), max_size=3)
ROSTER_DOCS = st.dictionaries(
    st.sampled_from(["created", "format", "label", "members", "min_nodes"]),
    st.one_of(st.text(max_size=10), st.integers(), MEMBERS))
SIGNED_DOCS = st.builds(
    lambda roster, signature: json.dumps({"format": "fedtune-signed-roster/1",
                                          "roster": roster, "signature": signature}),
    st.one_of(st.text(max_size=60), st.builds(json.dumps, ROSTER_DOCS)),
    st.text(HEX, min_size=128, max_size=128))


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200), SIGNED_DOCS))
def test_malformed_rosters_raise_only_the_roster_error(text: str | bytes) -> None:
    with contextlib.suppress(RosterError):
        SignedRoster.from_text(text)
