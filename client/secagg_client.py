"""The client's half of secure aggregation, one function per SecAgg stage.

A device keeps its round secrets (two X25519 private keys, the self-mask seed ``b``, the
shares peers sealed to it) in Flower's ``context.state`` between the stages, which Flower
persists per node and run in simulation and deployment alike; they never leave in clear. The
stages refuse to run out of order, for another round, or on instructions that would let the
coordinator learn one client's update (Bonawitz et al., CCS 2017, §4; the checks are in
:mod:`protocols.secagg.unmask`).

A device that pins an organisation key (:class:`SecAggIdentity`) takes part only in
*authenticated* rounds (§6, the active-adversary variant; :mod:`protocols.secagg.identity`):
it checks the roster's signature, signs its own advert with its identity key, refuses a key
list with any advert no roster member signed (substituted keys, sybils), and releases shares
only after a consistency round in which at least ``t`` survivors signed the very survivor
list it signed itself.

SecAgg+ (Bell et al., CCS 2020; ``degree`` > 0 in the setup): every client recomputes the
round's k-regular graph over the nodes that advertised keys (:mod:`protocols.secagg.graph`)
and shares its secrets with, masks against and answers unmask requests for only its
neighbourhood (its ``degree`` neighbours and itself); the threshold ``t`` is more than two
thirds of that neighbourhood. The survivor list stays global: each survivor signs the whole
list (as in SecAgg), but counts survivors, and consistency signatures, only within its own
neighbourhood, and answers only for the survivors and dropped nodes of its neighbourhood.
Counting a neighbourhood's signatures is what the threshold argument needs: the holders of
a node's shares are its neighbours, so two disjoint groups of them, each of ``t``, cannot
exist (``t > 2(k+1)/3``), and a signature from outside that neighbourhood says nothing about
what those holders were told.

Torch-free: the edge client runs these stages too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, RecordDict

from protocols.privacy.skellam import conditional_round, rounding_norm_bound, sample_skellam
from protocols.records import get_int
from protocols.secagg import (
    InconsistentRequest,
    check_unmask_request,
    decode_sum,
    encode,
    generate_keypair,
    load_private_key,
    masked_input,
    new_seed,
    open_sealed,
    pair_key,
    private_bytes,
    public_bytes,
    seal,
    share_associated_data,
    split,
)
from protocols.secagg.fixed_point import check_headroom, wrap_integers
from protocols.secagg.graph import neighbourhoods
from protocols.secagg.identity import (
    RosterError,
    SignedRoster,
    advert_message,
    consistency_message,
    identity_public_key,
    verify_signature,
)
from protocols.secagg.keys import SealError
from protocols.secagg.shamir import SHARE_BYTES
from protocols.secagg.wire import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyAdvert,
    MaskingInstruction,
    SealedShares,
    SecAggProtocolError,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
    pack_ids,
    unpack_ids,
)

log = logging.getLogger(__name__)

STATE_KEY = "secagg-state"
#: The highest SecAgg round id this node has started, kept apart from the round's secrets.
LAST_ROUND_KEY = "secagg-last-round"


@dataclass(frozen=True)
class SecAggIdentity:
    """What lets a device take part in authenticated rounds.

    ``org_public_key`` is the organisation key the device pins (raw 32 bytes; empty: the
    device accepts unauthenticated rounds only, the honest-but-curious model);
    ``identity_key`` is the device's own long-term Ed25519 key (None: it has none)."""

    org_public_key: bytes = b""
    identity_key: Ed25519PrivateKey | None = None

    @property
    def required(self) -> bool:
        return bool(self.org_public_key)


NO_IDENTITY = SecAggIdentity()


@dataclass
class RoundSecrets:
    """What one device remembers between the stages of one SecAgg round (hex-encoded).

    What grows with the number of nodes ``n`` is kept compact, since a device saves and
    loads this at every stage (and a simulation holds one per simulated device): the ids of
    U1 as packed 8-byte ids beside the JSON, the survivor list it signed as a SHA-256
    digest; peers' keys only for its neighbourhood."""

    round_id: int
    salt: str
    threshold: int
    num_nodes: int  # the count announced at setup: no later key list may exceed it
    seal_sk: str
    mask_sk: str
    b: str
    # setup -> shared -> masked (-> signed, authenticated rounds); deleted after unmasking
    stage: str = "setup"
    members: list[int] = field(default_factory=list)  # U1 (saved packed, not in the JSON)
    mask_pks: dict[str, str] = field(default_factory=dict)  # neighbourhood: node -> mask key
    seal_pks: dict[str, str] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)  # owner -> b-share | s-share
    # The roster's identity keys, kept from the setup until the key list is checked against
    # them (share-keys stage), then dropped: O(roster) per device is not kept for the round.
    roster_keys: list[str] = field(default_factory=list)
    identity_pks: dict[str, str] = field(default_factory=dict)  # neighbourhood: identity keys
    signed_survivors_sha256: str = ""  # digest of the sorted survivor list this node signed
    own_identity: str = ""  # this device's identity key; non-empty: an authenticated round
    degree: int = 0  # SecAgg+ graph degree (0: the complete graph of SecAgg)
    neighbours: list[int] = field(default_factory=list)  # this node's, on the round's graph

    def hood(self, me: int) -> set[int]:
        """The nodes that hold this node's shares and whose shares it holds: its neighbours
        and itself (every node of U1 on the complete graph)."""
        return {*self.neighbours, me}

    @property
    def authenticated(self) -> bool:
        return bool(self.own_identity)

    def save(self, context: Context) -> None:
        fields = asdict(self)
        members = pack_ids(fields.pop("members"))
        context.state.config_records[STATE_KEY] = ConfigRecord(
            {"json": json.dumps(fields).encode(), "members": members})

    @classmethod
    def load(cls, context: Context, *, round_id: int, stage: str | None) -> RoundSecrets:
        """The round's secrets; ``stage`` (when given) is where the node must be."""
        record = context.state.config_records.get(STATE_KEY)
        if record is None:
            raise SecAggProtocolError(
                f"no secure-aggregation state on this node for round {round_id}: the "
                f"coordinator skipped a stage (or this node restarted mid-round)"
            )
        fields = json.loads(bytes(record["json"]))  # type: ignore[arg-type]
        state = cls(**fields, members=unpack_ids(bytes(record["members"]),  # type: ignore[arg-type]
                                                 "members"))
        if state.round_id != round_id:
            raise SecAggProtocolError(
                f"instruction for SecAgg round {round_id}, but this node is in round "
                f"{state.round_id}; refusing a replayed or crossed message"
            )
        if stage is not None and state.stage != stage:
            raise SecAggProtocolError(
                f"stage out of order: expected the node to be at '{stage}', it is at "
                f"'{state.stage}'"
            )
        return state


def handle_setup(content: RecordDict, context: Context,
                 identity: SecAggIdentity = NO_IDENTITY) -> RecordDict:
    """Stage 0: fresh key pairs and self-mask seed for this round; advertise the public keys
    (signed with the device's identity key in an authenticated round)."""
    req = SetupRequest.from_record(content)  # refuses a threshold of two thirds or less
    record = context.state.config_records.get(LAST_ROUND_KEY)
    last = get_int(record, "round-id") if record is not None else None
    if last is not None and req.round_id <= last:
        raise SecAggProtocolError(
            f"setup for SecAgg round {req.round_id}, but this node already started round "
            f"{last}; refusing a stale or repeated setup (it would overwrite the secrets of "
            "the round in progress)")
    roster_keys = _check_roster(req, identity)
    context.state.config_records[LAST_ROUND_KEY] = ConfigRecord({"round-id": req.round_id})
    seal_sk, seal_pk = generate_keypair()
    mask_sk, mask_pk = generate_keypair()
    RoundSecrets(
        round_id=req.round_id, salt=req.salt.hex(), threshold=req.threshold,
        num_nodes=req.num_nodes, seal_sk=private_bytes(seal_sk).hex(),
        mask_sk=private_bytes(mask_sk).hex(),
        b=new_seed().hex(), roster_keys=roster_keys, degree=req.degree,
        own_identity=(identity_public_key(identity.identity_key).hex()
                      if roster_keys and identity.identity_key is not None else ""),
    ).save(context)
    advert = KeyAdvert(public_bytes(seal_pk), public_bytes(mask_pk))
    if roster_keys:
        assert identity.identity_key is not None  # _check_roster made sure
        signature = identity.identity_key.sign(advert_message(
            round_id=req.round_id, salt=req.salt, threshold=req.threshold,
            num_nodes=req.num_nodes, node_id=context.node_id, seal_pk=advert.seal_pk,
            mask_pk=advert.mask_pk, degree=req.degree))
        advert = KeyAdvert(advert.seal_pk, advert.mask_pk,
                           identity_public_key(identity.identity_key), signature)
    return advert.to_record()


def _check_roster(req: SetupRequest, identity: SecAggIdentity) -> list[str]:
    """The roster's identity keys (hex) in an authenticated round, [] otherwise; refuses a
    round that is less authenticated than the device requires or cannot be verified."""
    if not req.roster:
        if identity.required:
            raise SecAggProtocolError(
                "this device pins an organisation key and takes part only in authenticated "
                "secure aggregation, but the setup brings no signed roster; refusing (a "
                "coordinator could otherwise substitute the peers' keys)")
        return []
    if not identity.required or identity.identity_key is None:
        raise SecAggProtocolError(
            "the round is authenticated (it brings a signed roster) but this device has "
            + ("no organisation key pinned" if not identity.required else "no identity key")
            + "; set them in the device's config ([privacy] roster_public_key, [node] "
            "identity_key)")
    try:
        roster = SignedRoster.from_text(req.roster).verify(identity.org_public_key)
    except RosterError as bad:
        raise SecAggProtocolError(str(bad)) from None
    if identity_public_key(identity.identity_key) not in roster.keys:
        raise SecAggProtocolError(
            "this device's identity key is not in the organisation's roster; ask the "
            "organisation to admit it (fedtune roster)")
    if req.num_nodes > len(roster.members):
        raise SecAggProtocolError(
            f"the setup announces {req.num_nodes} nodes but the roster admits only "
            f"{len(roster.members)} devices; refusing")
    if req.num_nodes < roster.min_nodes:
        # The floor is the organisation's, not the coordinator's: a round of this device
        # and colluders would hand the coordinator this device's update.
        raise SecAggProtocolError(
            f"the setup announces a round of {req.num_nodes} nodes but the organisation's "
            f"roster requires at least {roster.min_nodes}; refusing")
    return sorted(key.hex() for key in roster.keys)


def handle_share_keys(content: RecordDict, context: Context) -> RecordDict:
    """Stage 1: Shamir-share ``b`` and the mask key among this node's neighbourhood on the
    round's graph (all of U1 in SecAgg), one sealed pair per neighbour."""
    req = ShareKeysRequest.from_record(content)
    state = RoundSecrets.load(context, round_id=req.round_id, stage="setup")
    me = context.node_id
    mine = req.adverts.get(me)
    seal_sk = load_private_key(bytes.fromhex(state.seal_sk))
    mask_sk = load_private_key(bytes.fromhex(state.mask_sk))
    if mine is None or mine.round_keys != (public_bytes(seal_sk.public_key()),
                                           public_bytes(mask_sk.public_key())):
        raise SecAggProtocolError(
            "the coordinator's key list does not carry this node's own public keys; "
            "refusing (a substituted key would let the coordinator open my shares)"
        )
    salt = bytes.fromhex(state.salt)
    members = req.nodes
    graph = neighbourhoods(members, degree=state.degree, round_id=req.round_id, salt=salt)
    hood = {*graph[me], me}
    if missing := sorted(hood - set(req.adverts)):
        raise SecAggProtocolError(
            f"the key list lacks the public keys of this node's neighbours {missing[:5]} on "
            "the round's graph; refusing (the coordinator must send every neighbour's advert)")
    if state.authenticated:
        if mine.identity_pk.hex() != state.own_identity:
            raise SecAggProtocolError(
                "the key list carries this node's keys under another identity; refusing")
        _check_signed_adverts(req, state, hood=hood)
    if len(members) < state.threshold:
        raise SecAggProtocolError(
            f"only {len(members)} nodes advertised keys, below the threshold "
            f"{state.threshold}"
        )
    if len(members) > state.num_nodes:
        raise SecAggProtocolError(
            f"{len(members)} nodes in the key list but {state.num_nodes} were announced at "
            f"setup; refusing (more nodes would lower the threshold below two thirds of them)"
        )
    neighbours = sorted(graph[me])
    if len(neighbours) + 1 < state.threshold:
        raise SecAggProtocolError(
            f"this node's neighbourhood has {len(neighbours) + 1} nodes, below the threshold "
            f"{state.threshold}")
    ids = [me, *neighbours]
    b_shares = split(bytes.fromhex(state.b), threshold=state.threshold, share_ids=ids)
    s_shares = split(private_bytes(mask_sk), threshold=state.threshold, share_ids=ids)
    sealed: dict[int, bytes] = {}
    for peer in neighbours:
        advert = req.adverts[peer]
        key = pair_key(seal_sk, advert.seal_pk, purpose="seal", round_id=req.round_id,
                       own_id=me, peer_id=peer, salt=salt)
        sealed[peer] = seal(key, b_shares[peer] + s_shares[peer],
                            associated_data=share_associated_data(
                                round_id=req.round_id, sender=me, receiver=peer))
    state.held = {str(me): (b_shares[me] + s_shares[me]).hex()}
    state.neighbours = neighbours
    # Only the neighbourhood's keys are kept: the node masks against, opens shares from and
    # checks signatures of no one else, and n keys per node would make its state grow with n.
    state.members = sorted(members)
    state.mask_pks = {str(n): req.adverts[n].mask_pk.hex() for n in sorted(hood)}
    state.seal_pks = {str(n): req.adverts[n].seal_pk.hex() for n in sorted(hood)}
    if state.authenticated:
        state.identity_pks = {str(n): req.adverts[n].identity_pk.hex() for n in sorted(hood)}
    state.roster_keys = []  # checked against the neighbourhood's adverts above
    state.stage = "shared"
    state.save(context)
    return SealedShares(sealed).to_record()


def _check_signed_adverts(req: ShareKeysRequest, state: RoundSecrets, *,
                          hood: set[int]) -> None:
    """Every advert of this node's neighbourhood (``hood``: all of U1 on the complete graph)
    signed, for this round and node, by a distinct roster member: a key the coordinator
    substituted or a node it invented has no such signature. In SecAgg+ the adverts outside
    the neighbourhood are not checked: this node shares with, masks against and answers for
    none of them, and checking all n would make every client's work grow with n again."""
    roster = set(state.roster_keys)
    seen: dict[str, int] = {}
    salt = bytes.fromhex(state.salt)
    for node, advert in req.adverts.items():
        if node not in hood:
            continue
        key = advert.identity_pk.hex()
        if key not in roster:
            raise SecAggProtocolError(
                f"node {node}'s keys are not signed by a device of the organisation's roster; "
                "refusing to share (substituted keys or a node the coordinator invented)")
        if key in seen:
            raise SecAggProtocolError(
                f"nodes {seen[key]} and {node} advertise one device's identity; refusing (one "
                "device, one node)")
        seen[key] = node
        if not advert.is_signed_for(round_id=req.round_id, salt=salt, threshold=state.threshold,
                                    num_nodes=state.num_nodes, node_id=node,
                                    degree=state.degree):
            raise SecAggProtocolError(
                f"node {node}'s advert signature does not verify for this round (its keys, "
                "node id, or the threshold, node count and graph degree this node was told); "
                "refusing (substituted or replayed keys, or devices told different "
                "thresholds or graphs)")


@dataclass(frozen=True)
class MaskedUpload:
    """A client's masked vector and, for a quantized round, what quantization lost."""

    vector: npt.NDArray[Any]
    modulus_bits: int
    lost: npt.NDArray[np.float64] | None = None  # float input minus what the sum will hold


def protect_and_encode(
    update: npt.NDArray[Any], inst: MaskingInstruction, *, num_clients: int,
    noise_rng: np.random.Generator, rounding_rng: np.random.Generator,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64] | None]:
    """Clip, noise, *then* quantize: the integers (mod ``2**m``) and what quantization lost.

    The order is the DP guarantee: the accountant assumes an update clipped to ``C`` plus
    ``N(0, σ²)``; quantizing (and clipping to the fixed-point range) acts on that noised
    vector only, so it is post-processing and the accounting is unchanged whatever the
    codec. The update reaches the encoder only through its clipped, noised value.

    A quantized upload with DP (``inst.integer_noise``) rounds first and then adds Skellam
    noise to the integers (:func:`_clip_round_and_noise`): rounding the Gaussian-noised
    value of one device on a coarse grid would not sum to a Gaussian.
    """
    x = np.asarray(update, dtype=np.float64)
    if inst.integer_noise:
        return _clip_round_and_noise(x, inst, num_clients=num_clients, noise_rng=noise_rng,
                                     rounding_rng=rounding_rng), None
    if inst.dp_noise_std > 0:
        x = _clip_norm(x, inst.dp_clip_norm)
        x = x + noise_rng.normal(0.0, inst.dp_noise_std, size=x.shape)
    scale, clip, bits = inst.scale, inst.clip_range, inst.modulus_bits
    if not inst.levels:
        return encode(x, scale=scale, clip=clip, modulus_bits=bits, num_clients=num_clients), None
    codes = encode(x, scale=scale, clip=clip, modulus_bits=bits, num_clients=num_clients,
                   rng=rounding_rng)
    sent = decode_sum(codes, scale=scale, clip=clip, modulus_bits=bits, num_clients=1)
    return codes, x - sent.astype(np.float64)


def _clip_norm(x: npt.NDArray[np.float64], bound: float) -> npt.NDArray[np.float64]:
    norm = float(np.linalg.norm(x))
    return x * (bound / norm) if norm > bound else x


def _clip_round_and_noise(
    x: npt.NDArray[np.float64], inst: MaskingInstruction, *, num_clients: int,
    noise_rng: np.random.Generator, rounding_rng: np.random.Generator,
) -> npt.NDArray[Any]:
    """The Skellam mechanism's device side (:mod:`protocols.privacy.skellam`): clip to L2
    norm ``C`` and each coordinate to the range, scale, round stochastically within the L2
    bound ``Δ2`` the coordinator accounted, add Skellam noise, wrap into the modulus. No
    error feedback: the residual would carry this device's un-noised rounding forward."""
    # The coordinator's parameters are checked before the data is looked at: a bound too
    # tight for a clipped update would make the rounding fail, or not, depending on it.
    needed = rounding_norm_bound(inst.scale * inst.dp_clip_norm, x.size)
    if inst.rounding_bound < needed:
        raise SecAggProtocolError(
            f"rounding bound {inst.rounding_bound:.6g} is below the {needed:.6g} a clipped "
            "update needs at this scale; refusing (the outcome would depend on my data)")
    check_headroom(num_clients=num_clients, clip=inst.clip_range, scale=inst.scale,
                   modulus_bits=inst.modulus_bits)
    if not np.isfinite(x).all():
        raise ValueError("the update has NaN or infinite coordinates; refusing to encode")
    clipped = np.clip(_clip_norm(x, inst.dp_clip_norm), -inst.clip_range, inst.clip_range)
    codes = conditional_round(clipped * inst.scale, bound=inst.rounding_bound, rng=rounding_rng)
    codes += sample_skellam(noise_rng, inst.skellam_variance, codes.size)
    return wrap_integers(codes, inst.modulus_bits)


def mask_update(
    update: npt.NDArray[Any], content: RecordDict, context: Context
) -> MaskedUpload:
    """Stage 2: open the peers' shares, (clip + noise for DP,) encode and mask the update.

    ``update`` is the flat trainable-adapter delta. With distributed DP the client clips it to
    L2 norm ``dp_clip_norm`` and adds ``N(0, dp_noise_std²)`` per coordinate from the OS
    CSPRNG; the coordinator chose ``dp_noise_std`` so the *sum* over at least ``t`` clients
    carries the target ``σ·C`` (Kairouz et al. 2021, distributed DP). The noise is added
    before masking (and before quantization, :func:`protect_and_encode`), so no party ever
    sees this client's un-noised update.
    """
    inst = MaskingInstruction.from_record(content)
    state = RoundSecrets.load(context, round_id=inst.round_id, stage="shared")
    me = context.node_id
    senders = set(inst.ciphertexts)
    known = set(state.neighbours)  # all of U1 but this node on the complete graph
    if me in senders or not senders <= known:
        raise SecAggProtocolError(
            f"the masking instruction names senders {sorted(senders - known)} outside the "
            f"nodes that advertised keys and are this node's neighbours (or this node itself)"
        )
    if len(senders) + 1 < state.threshold:
        raise SecAggProtocolError(
            f"only {len(senders) + 1} nodes of this node's neighbourhood shared keys, below "
            f"the threshold {state.threshold}"
        )
    seal_sk = load_private_key(bytes.fromhex(state.seal_sk))
    mask_sk = load_private_key(bytes.fromhex(state.mask_sk))
    salt = bytes.fromhex(state.salt)
    for sender, sealed in inst.ciphertexts.items():
        key = pair_key(seal_sk, bytes.fromhex(state.seal_pks[str(sender)]), purpose="seal",
                       round_id=inst.round_id, own_id=me, peer_id=sender, salt=salt)
        try:
            plain = open_sealed(key, sealed, associated_data=share_associated_data(
                round_id=inst.round_id, sender=sender, receiver=me))
        except SealError:
            raise SecAggProtocolError(
                f"the shares from node {sender} do not open (tampered or misrouted)"
            ) from None
        if len(plain) != 2 * SHARE_BYTES:
            raise SecAggProtocolError(f"the shares from node {sender} have the wrong size")
        state.held[str(sender)] = plain.hex()

    x_enc, lost = protect_and_encode(
        update, inst, num_clients=len(senders) + 1,
        noise_rng=np.random.default_rng(secrets.randbits(128)),
        rounding_rng=np.random.default_rng(secrets.randbits(128)))
    peers = {v: pair_key(mask_sk, bytes.fromhex(state.mask_pks[str(v)]), purpose="mask",
                         round_id=inst.round_id, own_id=me, peer_id=v, salt=salt)
             for v in senders}
    masked = masked_input(x_enc, own_id=me, peers=peers, self_seed=bytes.fromhex(state.b),
                          modulus_bits=inst.modulus_bits)
    state.stage = "masked"
    state.save(context)
    return MaskedUpload(masked, inst.modulus_bits, lost)


def handle_consistency(content: RecordDict, context: Context,
                       identity: SecAggIdentity = NO_IDENTITY) -> RecordDict:
    """Stage 3a (authenticated rounds): sign the survivor list, once per round."""
    req = ConsistencyRequest.from_record(content)
    state = RoundSecrets.load(context, round_id=req.round_id, stage="masked")
    if not state.authenticated or identity.identity_key is None:
        raise SecAggProtocolError("a consistency check in an unauthenticated round (or "
                                  "without this device's identity key); refusing")
    survivors = set(req.survivors)
    peers = {int(n) for n in state.held}
    near = survivors & state.hood(context.node_id)
    if (not near <= peers or not survivors <= set(state.members)
            or context.node_id not in survivors):
        raise SecAggProtocolError(
            "the survivor list names nodes outside this round's peers, or not this node")
    if len(near) < state.threshold:
        raise SecAggProtocolError(
            f"{len(near)} survivors in this node's neighbourhood, fewer than the threshold "
            f"{state.threshold}")
    signature = identity.identity_key.sign(consistency_message(
        round_id=req.round_id, salt=bytes.fromhex(state.salt), threshold=state.threshold,
        num_nodes=state.num_nodes, survivors=sorted(survivors)))
    state.signed_survivors_sha256 = survivors_digest(survivors)
    state.stage = "signed"
    state.save(context)
    return ConsistencySignature(signature).to_record()


def survivors_digest(survivors: Iterable[int]) -> str:
    """SHA-256 (hex) of a survivor list, sorted: what a node keeps of the list it signed."""
    return hashlib.sha256(pack_ids(sorted(survivors))).hexdigest()


def _check_consistency(req: UnmaskRequest, state: RoundSecrets, me: int) -> None:
    """At least ``t`` valid signatures over the very list this node signed, from survivors
    of this node's neighbourhood (everyone in SecAgg): a coordinator that told other
    clients another story cannot gather them (t > 2/3 of the neighbourhood)."""
    if survivors_digest(req.survivors) != state.signed_survivors_sha256:
        raise SecAggProtocolError(
            "refusing to unmask: the survivor list differs from the one this node signed "
            "in the consistency check")
    message = consistency_message(round_id=req.round_id, salt=bytes.fromhex(state.salt),
                                  threshold=state.threshold, num_nodes=state.num_nodes,
                                  survivors=sorted(req.survivors))
    hood = state.hood(me)
    for signer, signature in req.signatures.items():
        if signer not in hood:
            continue  # counts for nothing here (below); verifying it is work that grows with n
        key = state.identity_pks.get(str(signer))
        if signer not in req.survivors or key is None or not verify_signature(
                bytes.fromhex(key), signature, message):
            raise SecAggProtocolError(
                f"refusing to unmask: node {signer}'s consistency signature does not verify "
                "over this survivor list")
    near = set(req.signatures) & hood
    if len(near) < state.threshold:
        raise SecAggProtocolError(
            f"refusing to unmask: {len(near)} survivors of this node's neighbourhood signed "
            f"the survivor list, fewer than the threshold {state.threshold}")


def handle_unmask(content: RecordDict, context: Context) -> RecordDict:
    """Stage 3b: reveal b-shares of survivors and s-shares of dropped nodes, never both."""
    req = UnmaskRequest.from_record(content)
    state = RoundSecrets.load(context, round_id=req.round_id, stage=None)
    expected = "signed" if state.authenticated else "masked"
    if state.stage != expected:
        raise SecAggProtocolError(
            f"stage out of order: expected the node to be at '{expected}', it is at "
            f"'{state.stage}'" + (" (an authenticated round unmasks only after the "
                                  "consistency check)" if state.authenticated else ""))
    me = context.node_id
    if state.authenticated:
        _check_consistency(req, state, me)
    survivors, dropped = set(req.survivors), set(req.dropped)
    # The lists are global (they are what the survivors signed); this node answers for its
    # neighbourhood only (all of U1 on the complete graph), and checks the threshold there.
    known = set(state.members)
    hood = state.hood(me)
    try:
        check_unmask_request(survivors=survivors, dropped=dropped, my_peers=known,
                             threshold=0)
        survivors, dropped = survivors & hood, dropped & hood
        check_unmask_request(survivors=survivors, dropped=dropped,
                             my_peers={int(n) for n in state.held}, threshold=state.threshold)
    except InconsistentRequest as bad:
        raise SecAggProtocolError(f"refusing to unmask: {bad.reason}") from None
    if me not in survivors:
        raise SecAggProtocolError(
            "refusing to unmask: this node sent its masked input but is not named a "
            "survivor; revealing its mask-key shares could expose its update"
        )
    held = {int(n): bytes.fromhex(v) for n, v in state.held.items()}
    reply = UnmaskShares(
        b_shares={v: held[v][:SHARE_BYTES] for v in sorted(survivors)},
        s_shares={d: held[d][SHARE_BYTES:] for d in sorted(dropped)},
    )
    del context.state.config_records[STATE_KEY]  # one round, one unmasking
    return reply.to_record()
