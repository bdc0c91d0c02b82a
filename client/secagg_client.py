"""The client's half of secure aggregation, one function per SecAgg stage.

A device keeps its round secrets (two X25519 private keys, the self-mask seed ``b``, the
shares peers sealed to it) in Flower's ``context.state`` between the stages, which Flower
persists per node and run in simulation and deployment alike; they never leave in clear. The
stages refuse to run out of order, for another round, or on instructions that would let the
coordinator learn one client's update (Bonawitz et al., CCS 2017, §4; the checks are in
:mod:`protocols.secagg.unmask`).

Torch-free: the edge client runs these stages too.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ConfigRecord, Context, RecordDict

from protocols.records import get_int
from protocols.secagg import (
    InconsistentRequest,
    check_unmask_request,
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
from protocols.secagg.keys import SealError
from protocols.secagg.shamir import SHARE_BYTES
from protocols.secagg.wire import (
    KeyAdvert,
    MaskingInstruction,
    SealedShares,
    SecAggProtocolError,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)

log = logging.getLogger(__name__)

STATE_KEY = "secagg-state"
#: The highest SecAgg round id this node has started, kept apart from the round's secrets.
LAST_ROUND_KEY = "secagg-last-round"


@dataclass
class RoundSecrets:
    """What one device remembers between the stages of one SecAgg round (hex-encoded)."""

    round_id: int
    salt: str
    threshold: int
    num_nodes: int  # the count announced at setup: no later key list may exceed it
    seal_sk: str
    mask_sk: str
    b: str
    stage: str = "setup"  # setup -> shared -> masked; deleted after unmasking
    mask_pks: dict[str, str] = field(default_factory=dict)  # U1: node -> mask public key
    seal_pks: dict[str, str] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)  # owner -> b-share | s-share

    def save(self, context: Context) -> None:
        blob = json.dumps(asdict(self)).encode()
        context.state.config_records[STATE_KEY] = ConfigRecord({"json": blob})

    @classmethod
    def load(cls, context: Context, *, round_id: int, stage: str) -> RoundSecrets:
        record = context.state.config_records.get(STATE_KEY)
        if record is None:
            raise SecAggProtocolError(
                f"no secure-aggregation state on this node for round {round_id}: the "
                f"coordinator skipped a stage (or this node restarted mid-round)"
            )
        state = cls(**json.loads(bytes(record["json"])))  # type: ignore[arg-type]
        if state.round_id != round_id:
            raise SecAggProtocolError(
                f"instruction for SecAgg round {round_id}, but this node is in round "
                f"{state.round_id}; refusing a replayed or crossed message"
            )
        if state.stage != stage:
            raise SecAggProtocolError(
                f"stage out of order: expected the node to be at '{stage}', it is at "
                f"'{state.stage}'"
            )
        return state


def handle_setup(content: RecordDict, context: Context) -> RecordDict:
    """Stage 0: fresh key pairs and self-mask seed for this round; advertise the public keys."""
    req = SetupRequest.from_record(content)  # refuses a threshold of two thirds or less
    record = context.state.config_records.get(LAST_ROUND_KEY)
    last = get_int(record, "round-id") if record is not None else None
    if last is not None and req.round_id <= last:
        raise SecAggProtocolError(
            f"setup for SecAgg round {req.round_id}, but this node already started round "
            f"{last}; refusing a stale or repeated setup (it would overwrite the secrets of "
            "the round in progress)")
    context.state.config_records[LAST_ROUND_KEY] = ConfigRecord({"round-id": req.round_id})
    seal_sk, seal_pk = generate_keypair()
    mask_sk, mask_pk = generate_keypair()
    RoundSecrets(
        round_id=req.round_id, salt=req.salt.hex(), threshold=req.threshold,
        num_nodes=req.num_nodes, seal_sk=private_bytes(seal_sk).hex(),
        mask_sk=private_bytes(mask_sk).hex(),
        b=new_seed().hex(),
    ).save(context)
    return KeyAdvert(public_bytes(seal_pk), public_bytes(mask_pk)).to_record()


def handle_share_keys(content: RecordDict, context: Context) -> RecordDict:
    """Stage 1: Shamir-share ``b`` and the mask key among U1, one sealed pair per peer."""
    req = ShareKeysRequest.from_record(content)
    state = RoundSecrets.load(context, round_id=req.round_id, stage="setup")
    me = context.node_id
    mine = req.adverts.get(me)
    seal_sk = load_private_key(bytes.fromhex(state.seal_sk))
    mask_sk = load_private_key(bytes.fromhex(state.mask_sk))
    if mine is None or mine != KeyAdvert(public_bytes(seal_sk.public_key()),
                                         public_bytes(mask_sk.public_key())):
        raise SecAggProtocolError(
            "the coordinator's key list does not carry this node's own public keys; "
            "refusing (a substituted key would let the coordinator open my shares)"
        )
    if len(req.adverts) < state.threshold:
        raise SecAggProtocolError(
            f"only {len(req.adverts)} nodes advertised keys, below the threshold "
            f"{state.threshold}"
        )
    if len(req.adverts) > state.num_nodes:
        raise SecAggProtocolError(
            f"{len(req.adverts)} nodes in the key list but {state.num_nodes} were announced at "
            f"setup; refusing (more nodes would lower the threshold below two thirds of them)"
        )
    ids = list(req.adverts)
    b_shares = split(bytes.fromhex(state.b), threshold=state.threshold, share_ids=ids)
    s_shares = split(private_bytes(mask_sk), threshold=state.threshold, share_ids=ids)
    salt = bytes.fromhex(state.salt)
    sealed: dict[int, bytes] = {}
    for peer, advert in req.adverts.items():
        if peer == me:
            continue
        key = pair_key(seal_sk, advert.seal_pk, purpose="seal", round_id=req.round_id,
                       own_id=me, peer_id=peer, salt=salt)
        sealed[peer] = seal(key, b_shares[peer] + s_shares[peer],
                            associated_data=share_associated_data(
                                round_id=req.round_id, sender=me, receiver=peer))
    state.held = {str(me): (b_shares[me] + s_shares[me]).hex()}
    state.mask_pks = {str(n): a.mask_pk.hex() for n, a in req.adverts.items()}
    state.seal_pks = {str(n): a.seal_pk.hex() for n, a in req.adverts.items()}
    state.stage = "shared"
    state.save(context)
    return SealedShares(sealed).to_record()


def mask_update(
    update: npt.NDArray[np.float32], content: RecordDict, context: Context
) -> npt.NDArray[Any]:
    """Stage 2: open the peers' shares, (clip + noise for DP,) encode and mask the update.

    ``update`` is the flat trainable-adapter delta. With distributed DP the client clips it to
    L2 norm ``dp_clip_norm`` and adds ``N(0, dp_noise_std²)`` per coordinate from the OS
    CSPRNG; the coordinator chose ``dp_noise_std`` so the *sum* over at least ``t`` clients
    carries the target ``σ·C`` (Kairouz et al. 2021, distributed DP). The noise is added
    before masking, so no party ever sees this client's un-noised update.
    """
    inst = MaskingInstruction.from_record(content)
    state = RoundSecrets.load(context, round_id=inst.round_id, stage="shared")
    me = context.node_id
    senders = set(inst.ciphertexts)
    known = {int(n) for n in state.mask_pks}
    if me in senders or not senders <= known:
        raise SecAggProtocolError(
            f"the masking instruction names senders {sorted(senders - known)} outside the "
            f"nodes that advertised keys (or this node itself)"
        )
    if len(senders) + 1 < state.threshold:
        raise SecAggProtocolError(
            f"only {len(senders) + 1} nodes shared keys, below the threshold {state.threshold}"
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

    x = np.asarray(update, dtype=np.float64)
    if inst.dp_noise_std > 0:
        norm = float(np.linalg.norm(x))
        if norm > inst.dp_clip_norm:
            x = x * (inst.dp_clip_norm / norm)
        rng = np.random.default_rng(secrets.randbits(128))
        x = x + rng.normal(0.0, inst.dp_noise_std, size=x.shape)
    x_enc = encode(x, scale=inst.scale, clip=inst.clip_range, modulus_bits=inst.modulus_bits,
                   num_clients=len(senders) + 1)
    peers = {v: pair_key(mask_sk, bytes.fromhex(state.mask_pks[str(v)]), purpose="mask",
                         round_id=inst.round_id, own_id=me, peer_id=v, salt=salt)
             for v in senders}
    masked = masked_input(x_enc, own_id=me, peers=peers, self_seed=bytes.fromhex(state.b),
                          modulus_bits=inst.modulus_bits)
    state.stage = "masked"
    state.save(context)
    return masked


def handle_unmask(content: RecordDict, context: Context) -> RecordDict:
    """Stage 3: reveal b-shares of survivors and s-shares of dropped nodes, never both."""
    req = UnmaskRequest.from_record(content)
    state = RoundSecrets.load(context, round_id=req.round_id, stage="masked")
    me = context.node_id
    survivors, dropped = set(req.survivors), set(req.dropped)
    try:
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
