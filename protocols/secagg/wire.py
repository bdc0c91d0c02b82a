"""What crosses the wire in a SecAgg round, as Flower records: one dataclass per message.

A fedtune round with secure aggregation is four exchanges on Flower's Message API (the
coordinator drives them from its strategy; see ``server/secagg.py`` and
``client/secagg_client.py``):

====================  ===============================  =====================================
message type          coordinator → client             client → coordinator
====================  ===============================  =====================================
``query.secagg_setup``       :class:`SetupRequest`           :class:`KeyAdvert`
``query.secagg_share_keys``  :class:`ShareKeysRequest`       :class:`SealedShares`
``train``                    adapter + :class:`MaskingInstruction`  masked update (``masked``)
``query.secagg_consistency`` :class:`ConsistencyRequest`     :class:`ConsistencySignature`
``query.secagg_unmask``      :class:`UnmaskRequest`          :class:`UnmaskShares`
====================  ===============================  =====================================

*Authenticated* rounds (a signed roster in the setup, :mod:`protocols.secagg.identity`) add
each device's identity key and signature to its advert and the consistency exchange, whose
signatures ride on the unmask request; unauthenticated rounds skip both.

Every payload is a ``ConfigRecord`` under :data:`RECORD` (the masked update is an
``ArrayRecord`` under :data:`MASKED`). Node ids are packed as 8-byte big-endian integers:
Flower's node ids are unsigned 64-bit, which a ``ConfigRecord`` int (signed 64-bit) cannot
always hold. Parsing checks every field and raises :class:`SecAggProtocolError` naming it,
so a malformed or hostile message fails with a reason instead of a ``KeyError`` deep in the
crypto.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from protocols import bitpack
from protocols.errors import InvalidUpdate
from protocols.secagg.fixed_point import ALL_MODULUS_BITS, uint_dtype
from protocols.secagg.graph import check_degree, neighbourhood_size
from protocols.secagg.identity import advert_message, verify_signature
from protocols.secagg.unmask import min_threshold

RECORD = "secagg"
MASKED = "masked"
MASKED_VECTOR = "vector"

SETUP = "query.secagg_setup"
SHARE_KEYS = "query.secagg_share_keys"
CONSISTENCY = "query.secagg_consistency"
UNMASK = "query.secagg_unmask"

SALT_BYTES = 16
KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SecAggProtocolError(ValueError):
    """A SecAgg message is malformed or inconsistent; ``reason`` says which field and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- packing helpers ------------------------------------------------------------------------
def pack_ids(ids: Sequence[int]) -> bytes:
    """Node ids as concatenated 8-byte big-endian unsigned integers."""
    try:
        return b"".join(struct.pack(">Q", int(i)) for i in ids)
    except struct.error:
        raise SecAggProtocolError(
            f"node ids must be unsigned 64-bit integers: {list(ids)}"
        ) from None


def unpack_ids(data: bytes, field: str) -> list[int]:
    if len(data) % 8:
        raise SecAggProtocolError(f"{field}: {len(data)} bytes is not a list of 8-byte node ids")
    ids = [struct.unpack(">Q", data[i : i + 8])[0] for i in range(0, len(data), 8)]
    if len(set(ids)) != len(ids):
        raise SecAggProtocolError(f"{field}: node ids repeat")
    return ids


def _record(content: RecordDict) -> ConfigRecord:
    if RECORD not in content.config_records:
        raise SecAggProtocolError(f"no ConfigRecord under `{RECORD}`")
    return content.config_records[RECORD]


def _get(record: ConfigRecord, key: str, kind: type) -> Any:
    if key not in record:
        raise SecAggProtocolError(f"`{RECORD}` record has no `{key}`")
    value = record[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise SecAggProtocolError(
            f"`{key}`: expected {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _round_id(record: ConfigRecord) -> int:
    """A SecAgg round id: a non-negative signed 64-bit integer (it is signed as such)."""
    value: int = _get(record, "round-id", int)
    if not 0 <= value < 2**63:
        raise SecAggProtocolError(f"`round-id`: {value} is not in [0, 2**63)")
    return value


def _get_bytes_list(record: ConfigRecord, key: str, count: int, size: int | None) -> list[bytes]:
    value = record.get(key, None)
    if count == 0 and value in (None, []):
        return []
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise SecAggProtocolError(f"`{key}`: expected a list of bytes")
    items: list[bytes] = [v for v in value if isinstance(v, bytes)]
    if len(items) != count:
        raise SecAggProtocolError(f"`{key}`: expected {count} entries, got {len(items)}")
    if size is not None and any(len(v) != size for v in items):
        raise SecAggProtocolError(f"`{key}`: every entry must be {size} bytes")
    return items


def _put_list(record: ConfigRecord, key: str, values: Sequence[bytes]) -> None:
    # An empty list has no element type for Flower to serialise; absent reads back as [].
    if values:
        record[key] = list(values)


# -- stage 0: set up -------------------------------------------------------------------------
@dataclass(frozen=True)
class SetupRequest:
    """Start a round: every sampled client makes two fresh X25519 key pairs for it.

    ``roster`` is the organisation's signed roster (``SignedRoster.to_text()`` as UTF-8) in
    an authenticated round, empty otherwise. ``degree`` is the SecAgg+ graph's (0: the
    complete graph of SecAgg; even and >= 2: each node shares and masks with ``degree``
    neighbours, :mod:`protocols.secagg.graph`); the threshold then counts within one
    neighbourhood of ``degree + 1`` nodes."""

    round_id: int
    salt: bytes
    threshold: int
    num_nodes: int
    roster: bytes = b""
    degree: int = 0

    @property
    def neighbourhood(self) -> int:
        """The nodes that hold one node's shares, itself included."""
        return neighbourhood_size(self.num_nodes, self.degree)

    def to_record(self) -> RecordDict:
        rec = ConfigRecord({
            "round-id": self.round_id, "salt": self.salt, "threshold": self.threshold,
            "num-nodes": self.num_nodes, "degree": self.degree,
        })
        if self.roster:
            rec["roster"] = self.roster
        return RecordDict({RECORD: rec})

    @classmethod
    def from_record(cls, content: RecordDict) -> SetupRequest:
        rec = _record(content)
        req = cls(_round_id(rec), _get(rec, "salt", bytes),
                  _get(rec, "threshold", int), _get(rec, "num-nodes", int),
                  _get(rec, "roster", bytes) if "roster" in rec else b"",
                  _get(rec, "degree", int))
        if len(req.salt) != SALT_BYTES:
            raise SecAggProtocolError(f"`salt`: expected {SALT_BYTES} bytes")
        try:
            check_degree(req.degree)
        except ValueError as bad:
            raise SecAggProtocolError(f"`degree`: {bad}") from None
        if req.num_nodes < 1 or req.degree >= 2**32:
            raise SecAggProtocolError("`num-nodes` must be >= 1 and `degree` < 2**32")
        size = req.neighbourhood
        low = min_threshold(size)
        if not low <= req.threshold <= size:
            what = f"{req.num_nodes} nodes" if size == req.num_nodes else (
                f"a neighbourhood of {size} nodes (SecAgg+ degree {req.degree})")
            raise SecAggProtocolError(
                f"threshold {req.threshold} of {what} must be in [{low}, "
                f"{size}]: more than two thirds of the nodes (at least 2), or a "
                "coordinator sending different survivor lists to different clients could "
                "collect both kinds of shares of one node and unmask its update"
            )
        return req


@dataclass(frozen=True)
class KeyAdvert:
    """A client's two public keys: one to seal shares to peers, one to agree mask seeds.

    In an authenticated round it also carries the device's identity public key and its
    signature over :func:`protocols.secagg.identity.advert_message`."""

    seal_pk: bytes
    mask_pk: bytes
    identity_pk: bytes = b""
    signature: bytes = b""

    @property
    def round_keys(self) -> tuple[bytes, bytes]:
        return self.seal_pk, self.mask_pk

    def to_record(self) -> RecordDict:
        rec = ConfigRecord({"seal-pk": self.seal_pk, "mask-pk": self.mask_pk})
        if self.identity_pk:
            rec["identity-pk"] = self.identity_pk
            rec["signature"] = self.signature
        return RecordDict({RECORD: rec})

    @classmethod
    def from_record(cls, content: RecordDict) -> KeyAdvert:
        rec = _record(content)
        signed = "identity-pk" in rec or "signature" in rec
        advert = cls(_get(rec, "seal-pk", bytes), _get(rec, "mask-pk", bytes),
                     _get(rec, "identity-pk", bytes) if signed else b"",
                     _get(rec, "signature", bytes) if signed else b"")
        advert.check()
        return advert

    def is_signed_for(self, *, round_id: int, salt: bytes, threshold: int, num_nodes: int,
                      node_id: int, degree: int = 0) -> bool:
        """Whether the identity key it carries signed these round keys for this round,
        threshold, node count, graph degree and node
        (:func:`protocols.secagg.identity.advert_message`)."""
        return verify_signature(self.identity_pk, self.signature, advert_message(
            round_id=round_id, salt=salt, threshold=threshold, num_nodes=num_nodes,
            node_id=node_id, seal_pk=self.seal_pk, mask_pk=self.mask_pk, degree=degree))

    def check(self) -> None:
        if len(self.seal_pk) != KEY_BYTES or len(self.mask_pk) != KEY_BYTES:
            raise SecAggProtocolError(f"public keys must be {KEY_BYTES} bytes")
        if self.seal_pk == self.mask_pk:
            raise SecAggProtocolError("seal and mask public keys must differ")
        signed = bool(self.identity_pk or self.signature)
        if signed and (len(self.identity_pk) != KEY_BYTES
                       or len(self.signature) != SIGNATURE_BYTES):
            raise SecAggProtocolError(
                f"a signed advert needs a {KEY_BYTES}-byte identity key and a "
                f"{SIGNATURE_BYTES}-byte signature")


# -- stage 1: share keys ---------------------------------------------------------------------
@dataclass(frozen=True)
class ShareKeysRequest:
    """The nodes that advertised keys (the set U1) and their public keys: seal a share pair
    to each neighbour.

    On the complete graph ``adverts`` holds every node of U1. In SecAgg+ the coordinator
    sends each node only its neighbourhood's adverts and the ids of all of U1 in ``members``
    (the graph is computed from the ids alone): a node needs no stranger's keys, and sending
    all ``n`` adverts to all ``n`` nodes made the round's traffic, and each node's parsing,
    grow with n² (issue 18)."""

    round_id: int
    adverts: Mapping[int, KeyAdvert]
    members: tuple[int, ...] = ()  # U1 when ``adverts`` holds only part of it

    @property
    def nodes(self) -> tuple[int, ...]:
        """Every node of U1, whether or not its advert is in this request."""
        return self.members or tuple(self.adverts)

    def to_record(self) -> RecordDict:
        nodes = list(self.adverts)
        rec = ConfigRecord({"round-id": self.round_id, "nodes": pack_ids(nodes)})
        if self.members:
            rec["members"] = pack_ids(self.members)
        _put_list(rec, "seal-pks", [self.adverts[n].seal_pk for n in nodes])
        _put_list(rec, "mask-pks", [self.adverts[n].mask_pk for n in nodes])
        if any(a.identity_pk for a in self.adverts.values()):
            _put_list(rec, "identity-pks", [self.adverts[n].identity_pk for n in nodes])
            _put_list(rec, "signatures", [self.adverts[n].signature for n in nodes])
        return RecordDict({RECORD: rec})

    @classmethod
    def from_record(cls, content: RecordDict) -> ShareKeysRequest:
        rec = _record(content)
        nodes = unpack_ids(_get(rec, "nodes", bytes), "nodes")
        members: tuple[int, ...] = ()
        if "members" in rec:
            members = tuple(unpack_ids(_get(rec, "members", bytes), "members"))
            if not set(nodes) <= set(members):
                raise SecAggProtocolError(
                    f"adverts of nodes {sorted(set(nodes) - set(members))} that 'members' "
                    "does not list")
        seal = _get_bytes_list(rec, "seal-pks", len(nodes), KEY_BYTES)
        mask = _get_bytes_list(rec, "mask-pks", len(nodes), KEY_BYTES)
        keys = seal + mask
        if len(set(keys)) != len(keys):
            raise SecAggProtocolError("advertised public keys repeat across nodes")
        if "identity-pks" in rec or "signatures" in rec:
            ids = _get_bytes_list(rec, "identity-pks", len(nodes), KEY_BYTES)
            sigs = _get_bytes_list(rec, "signatures", len(nodes), SIGNATURE_BYTES)
        else:
            ids = sigs = [b""] * len(nodes)
        return cls(_round_id(rec),
                   {n: KeyAdvert(s, m, i, g)
                    for n, s, m, i, g in zip(nodes, seal, mask, ids, sigs, strict=True)},
                   members)


@dataclass(frozen=True)
class SealedShares:
    """One sealed (b-share, s-share) pair per receiver; only the receiver can open each."""

    ciphertexts: Mapping[int, bytes]

    def to_record(self) -> RecordDict:
        nodes = list(self.ciphertexts)
        rec = ConfigRecord({"receivers": pack_ids(nodes)})
        _put_list(rec, "ciphertexts", [self.ciphertexts[n] for n in nodes])
        return RecordDict({RECORD: rec})

    @classmethod
    def from_record(cls, content: RecordDict) -> SealedShares:
        rec = _record(content)
        nodes = unpack_ids(_get(rec, "receivers", bytes), "receivers")
        texts = _get_bytes_list(rec, "ciphertexts", len(nodes), None)
        return cls(dict(zip(nodes, texts, strict=True)))


# -- stage 2: masked input (rides on the train message) --------------------------------------
@dataclass(frozen=True)
class MaskingInstruction:
    """How to encode and mask the update, and the shares peers sealed to this client.

    ``senders`` is U2, the clients whose shares reached the coordinator: a client masks with
    exactly these peers. ``dp_noise_std`` > 0 asks each client to add its share of the
    distributed Gaussian noise after clipping its update to L2 norm ``dp_clip_norm``.
    ``levels`` > 0 asks for a quantized upload: stochastic rounding to codes in
    ``[-levels, levels]`` (``scale = levels / clip_range``) summed in a small modulus; 0 is
    the exact fixed point (round to nearest, 32 or 64 bits). With DP on a quantized upload
    the noise is integer instead (:mod:`protocols.privacy.skellam`): ``rounding_bound`` > 0
    is the L2 bound of the rounded, scaled update and ``skellam_variance`` the variance of
    the Skellam noise this client adds to it, in code units; ``dp_noise_std`` is then 0.
    """

    round_id: int
    ciphertexts: Mapping[int, bytes]
    modulus_bits: int
    scale: float
    clip_range: float
    dp_clip_norm: float = 0.0
    dp_noise_std: float = 0.0
    levels: int = 0
    rounding_bound: float = 0.0
    skellam_variance: float = 0.0

    @property
    def integer_noise(self) -> bool:
        """Whether this round's DP noise is Skellam, added to the integers after rounding."""
        return self.skellam_variance > 0

    def to_record(self) -> ConfigRecord:
        nodes = list(self.ciphertexts)
        rec = ConfigRecord({
            "round-id": self.round_id, "senders": pack_ids(nodes),
            "modulus-bits": self.modulus_bits, "scale": float(self.scale),
            "clip-range": float(self.clip_range), "dp-clip-norm": float(self.dp_clip_norm),
            "dp-noise-std": float(self.dp_noise_std), "levels": self.levels,
            "rounding-bound": float(self.rounding_bound),
            "skellam-variance": float(self.skellam_variance),
        })
        _put_list(rec, "ciphertexts", [self.ciphertexts[n] for n in nodes])
        return rec

    @classmethod
    def from_record(cls, content: RecordDict) -> MaskingInstruction:
        rec = _record(content)
        nodes = unpack_ids(_get(rec, "senders", bytes), "senders")
        texts = _get_bytes_list(rec, "ciphertexts", len(nodes), None)
        inst = cls(
            round_id=_round_id(rec),
            ciphertexts=dict(zip(nodes, texts, strict=True)),
            modulus_bits=_get(rec, "modulus-bits", int),
            scale=_get(rec, "scale", float),
            clip_range=_get(rec, "clip-range", float),
            dp_clip_norm=_get(rec, "dp-clip-norm", float),
            dp_noise_std=_get(rec, "dp-noise-std", float),
            levels=_get(rec, "levels", int),
            rounding_bound=_get(rec, "rounding-bound", float),
            skellam_variance=_get(rec, "skellam-variance", float),
        )
        if inst.modulus_bits not in ALL_MODULUS_BITS:
            raise SecAggProtocolError(f"`modulus-bits` must be 2 to 32 or 64, got "
                                      f"{inst.modulus_bits}")
        if not 0 <= inst.levels < 1 << 15 or (inst.levels and inst.modulus_bits > 32):
            raise SecAggProtocolError(f"`levels` must be 0, or in [1, 2**15) with a modulus "
                                      f"of at most 32 bits; got {inst.levels}")
        for name in ("scale", "clip_range"):
            value = getattr(inst, name)
            if not (math.isfinite(value) and value > 0):
                raise SecAggProtocolError(f"`{name}` must be finite and > 0, got {value}")
        for name in ("dp_clip_norm", "dp_noise_std", "rounding_bound", "skellam_variance"):
            value = getattr(inst, name)
            if not (math.isfinite(value) and value >= 0):
                raise SecAggProtocolError(f"`{name}` must be finite and >= 0, got {value}")
        if inst.dp_noise_std > 0 and inst.levels:
            raise SecAggProtocolError(
                "dp-noise-std on a quantized upload (levels > 0): rounding each device's "
                "Gaussian share is not accounted; quantized uploads take skellam-variance")
        if (inst.dp_noise_std > 0 or inst.integer_noise) != (inst.dp_clip_norm > 0):
            raise SecAggProtocolError(
                "distributed DP needs both dp-clip-norm and a noise (dp-noise-std or "
                "skellam-variance)")
        if inst.integer_noise != (inst.rounding_bound > 0) or (
                inst.integer_noise and not inst.levels):
            raise SecAggProtocolError(
                "skellam-variance needs rounding-bound and a quantized upload (levels > 0)")
        return inst


def masked_record(vector: npt.NDArray[Any], modulus_bits: int) -> ArrayRecord:
    """The masked vector as it travels: native words for 32 and 64 bits, ``m``-bit fields
    packed into bytes for a smaller modulus (:mod:`protocols.bitpack`)."""
    if modulus_bits < 32:
        vector = bitpack.pack(vector, modulus_bits)
    return ArrayRecord({MASKED_VECTOR: Array(np.ascontiguousarray(vector))})


def read_masked(content: RecordDict, *, length: int, modulus_bits: int) -> npt.NDArray[Any]:
    """The masked vector of a train reply, checked for presence, dtype and length
    (unpacked to ``uint32`` for a small modulus)."""
    if MASKED not in content.array_records:
        raise SecAggProtocolError(f"no ArrayRecord under `{MASKED}`")
    record = content.array_records[MASKED]
    if list(record.keys()) != [MASKED_VECTOR]:
        raise SecAggProtocolError(f"`{MASKED}` must hold exactly one array `{MASKED_VECTOR}`")
    try:
        vec = record[MASKED_VECTOR].numpy()
    except Exception as exc:
        raise SecAggProtocolError(f"`{MASKED_VECTOR}` does not decode: {exc}") from None
    if modulus_bits < 32:
        try:
            return bitpack.unpack(vec, modulus_bits, length, what=MASKED_VECTOR)
        except InvalidUpdate as bad:
            raise SecAggProtocolError(str(bad)) from None
    dtype = uint_dtype(modulus_bits)
    if vec.dtype != dtype or vec.shape != (length,):
        raise SecAggProtocolError(
            f"masked vector must be {dtype}[{length}], got {vec.dtype}{list(vec.shape)}"
        )
    return vec


# -- stage 3a: consistency check (authenticated rounds) ---------------------------------------
@dataclass(frozen=True)
class ConsistencyRequest:
    """The survivor list (whose masked inputs arrived): each survivor signs it once."""

    round_id: int
    survivors: tuple[int, ...]

    def to_record(self) -> RecordDict:
        return RecordDict({RECORD: ConfigRecord({
            "round-id": self.round_id, "survivors": pack_ids(self.survivors)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> ConsistencyRequest:
        rec = _record(content)
        return cls(_round_id(rec),
                   tuple(unpack_ids(_get(rec, "survivors", bytes), "survivors")))


@dataclass(frozen=True)
class ConsistencySignature:
    """A survivor's identity-key signature over the survivor list it was sent."""

    signature: bytes

    def to_record(self) -> RecordDict:
        return RecordDict({RECORD: ConfigRecord({"signature": self.signature})})

    @classmethod
    def from_record(cls, content: RecordDict) -> ConsistencySignature:
        sig = _get(_record(content), "signature", bytes)
        if len(sig) != SIGNATURE_BYTES:
            raise SecAggProtocolError(f"`signature` must be {SIGNATURE_BYTES} bytes")
        return cls(sig)


# -- stage 3b: unmask ------------------------------------------------------------------------
@dataclass(frozen=True)
class UnmaskRequest:
    """Which clients' inputs arrived (reveal their b-shares) and which did not (s-shares).

    In an authenticated round ``signatures`` holds the survivors' consistency signatures
    (node -> signature over the survivor list); each client checks them before answering."""

    round_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: Mapping[int, bytes] = field(default_factory=dict)

    def to_record(self) -> RecordDict:
        rec = ConfigRecord({
            "round-id": self.round_id, "survivors": pack_ids(self.survivors),
            "dropped": pack_ids(self.dropped),
        })
        if self.signatures:
            rec["signers"] = pack_ids(list(self.signatures))
            _put_list(rec, "signatures", list(self.signatures.values()))
        return RecordDict({RECORD: rec})

    @classmethod
    def from_record(cls, content: RecordDict) -> UnmaskRequest:
        rec = _record(content)
        signatures: dict[int, bytes] = {}
        if "signers" in rec:
            signers = unpack_ids(_get(rec, "signers", bytes), "signers")
            sigs = _get_bytes_list(rec, "signatures", len(signers), SIGNATURE_BYTES)
            signatures = dict(zip(signers, sigs, strict=True))
        return cls(_round_id(rec),
                   tuple(unpack_ids(_get(rec, "survivors", bytes), "survivors")),
                   tuple(unpack_ids(_get(rec, "dropped", bytes), "dropped")), signatures)


@dataclass(frozen=True)
class UnmaskShares:
    """This client's shares: of ``b_u`` for each survivor, of ``s_u`` for each dropped node."""

    b_shares: Mapping[int, bytes]
    s_shares: Mapping[int, bytes]

    def to_record(self) -> RecordDict:
        rec = ConfigRecord({"b-owners": pack_ids(list(self.b_shares)),
                            "s-owners": pack_ids(list(self.s_shares))})
        _put_list(rec, "b-shares", list(self.b_shares.values()))
        _put_list(rec, "s-shares", list(self.s_shares.values()))
        return RecordDict({RECORD: rec})

    @classmethod
    def from_record(cls, content: RecordDict) -> UnmaskShares:
        rec = _record(content)
        b_owners = unpack_ids(_get(rec, "b-owners", bytes), "b-owners")
        s_owners = unpack_ids(_get(rec, "s-owners", bytes), "s-owners")
        b = _get_bytes_list(rec, "b-shares", len(b_owners), None)
        s = _get_bytes_list(rec, "s-shares", len(s_owners), None)
        return cls(dict(zip(b_owners, b, strict=True)), dict(zip(s_owners, s, strict=True)))


def fixed_point_scale(*, num_clients: int, clip_range: float, modulus_bits: int) -> float:
    """The largest power-of-two scale whose sum of ``num_clients`` encodings cannot wrap.

    Headroom rule of :func:`protocols.secagg.fixed_point.check_headroom`:
    ``n · ceil(range · scale) < 2**(k-1)``; one bit is kept spare for the rounding up.
    """
    limit = 2 ** (modulus_bits - 1)
    exponent = math.floor(math.log2((limit - 1) / (num_clients * clip_range))) - 1
    if exponent < 1:
        raise ValueError(
            f"secagg range {clip_range} with {num_clients} clients leaves no fixed-point "
            f"precision in {modulus_bits} bits; lower security.secagg_range or use 64 bits"
        )
    return float(2**exponent)
