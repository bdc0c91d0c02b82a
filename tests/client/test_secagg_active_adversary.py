"""A lying coordinator against the real client stages of authenticated secure aggregation.

Each test plays the coordinator by hand — it builds the messages an attacker would send —
against :mod:`client.secagg_client`'s handlers with real keys, a real signed roster and real
crypto (issue 14, Bonawitz et al. 2017 §6). An attack is stopped when the client raises
:class:`SecAggProtocolError` naming it *before* it seals or reveals any share.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, RecordDict

from client.secagg_client import (
    STATE_KEY,
    RoundSecrets,
    SecAggIdentity,
    handle_consistency,
    handle_setup,
    handle_share_keys,
    handle_unmask,
    mask_update,
)
from protocols.manifest import public_key_bytes
from protocols.secagg import generate_keypair, public_bytes, reconstruct_secrets, wire
from protocols.secagg.identity import (
    Roster,
    SignedRoster,
    advert_message,
    identity_public_key,
)

SALT = b"s" * 16
ROUND = 3000
DIM = 12


@dataclass
class Device:
    node: int
    key: Ed25519PrivateKey
    context: Context

    def identity(self, org: bytes) -> SecAggIdentity:
        return SecAggIdentity(org, self.key)


class Federation:
    """Devices admitted by an organisation; the test is the (lying) coordinator."""

    def __init__(self, nodes: list[int], *, extra_roster: int = 0,
                 min_nodes: int | None = None) -> None:
        self.org = Ed25519PrivateKey.generate()
        self.org_pk = public_key_bytes(self.org.public_key())
        self.devices = {n: Device(n, Ed25519PrivateKey.generate(), _context(n)) for n in nodes}
        self.outsiders = [Ed25519PrivateKey.generate() for _ in range(extra_roster)]
        members = {f"device-{n}": identity_public_key(d.key) for n, d in self.devices.items()}
        members |= {f"spare-{i}": identity_public_key(k) for i, k in enumerate(self.outsiders)}
        roster = Roster.of(members, min_nodes=min_nodes)
        self.roster = SignedRoster.sign(roster, self.org).to_text().encode()
        self.told: tuple[int, int] = (0, 0)  # the (threshold, node count) of the last setup

    def ident(self, node: int) -> SecAggIdentity:
        return self.devices[node].identity(self.org_pk)

    def setup(self, threshold: int, *, num_nodes: int | None = None,
              round_id: int = ROUND, degree: int = 0) -> dict[int, wire.KeyAdvert]:
        self.told = (threshold, num_nodes or len(self.devices))
        req = wire.SetupRequest(round_id, SALT, threshold, self.told[1],
                                self.roster, degree).to_record()
        return {n: wire.KeyAdvert.from_record(handle_setup(req, d.context, self.ident(n)))
                for n, d in self.devices.items()}

    def share(self, adverts: dict[int, wire.KeyAdvert]) -> dict[int, dict[int, bytes]]:
        """Every device seals its shares; returns receiver -> sender -> ciphertext."""
        request = wire.ShareKeysRequest(ROUND, adverts).to_record()
        inbox: dict[int, dict[int, bytes]] = {n: {} for n in self.devices}
        for n, d in self.devices.items():
            sealed = wire.SealedShares.from_record(handle_share_keys(request, d.context))
            for receiver, text in sealed.ciphertexts.items():
                inbox[receiver][n] = text
        return inbox

    def mask(self, inbox: dict[int, dict[int, bytes]]) -> None:
        for n, d in self.devices.items():
            inst = wire.MaskingInstruction(ROUND, inbox[n], 32, 2.0**20, 0.5)
            mask_update(np.full(DIM, 0.01 * n, np.float32),
                        RecordDict({wire.RECORD: inst.to_record()}), d.context)

    def through_masking(self, threshold: int, degree: int = 0) -> dict[int, wire.KeyAdvert]:
        adverts = self.setup(threshold, degree=degree)
        self.mask(self.share(adverts))
        return adverts


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _stage(device: Device) -> str:
    return RoundSecrets.load(device.context, round_id=ROUND, stage=None).stage


def _forged_advert(node: int, signer: Ed25519PrivateKey | None, *,
                   identity_pk: bytes | None = None,
                   told: tuple[int, int] = (3, 3)) -> wire.KeyAdvert:
    """Round keys the coordinator made itself, signed with a key it holds (or unsigned) for
    a round of ``told`` = (threshold, node count)."""
    seal_pk = public_bytes(generate_keypair()[0].public_key())
    mask_pk = public_bytes(generate_keypair()[0].public_key())
    if signer is None:  # (a list mixing signed and unsigned adverts needs filler fields)
        return wire.KeyAdvert(seal_pk, mask_pk, b"\0" * 32, b"\0" * 64)
    sig = signer.sign(advert_message(round_id=ROUND, salt=SALT, threshold=told[0],
                                     num_nodes=told[1], node_id=node, seal_pk=seal_pk,
                                     mask_pk=mask_pk))
    return wire.KeyAdvert(seal_pk, mask_pk, identity_pk or identity_public_key(signer), sig)


# -- the key list: substituted keys and sybils ----------------------------------------------


def test_substituted_peer_keys_are_refused_before_any_share_is_sealed() -> None:
    """The coordinator swaps threshold-many peers' keys for its own (t = 4 of 5): unsigned,
    signed with its own key, or labelled with the peer's identity but its own signature.
    The victim refuses each list and keeps its secrets unshared."""
    fed = Federation([1, 2, 3, 4, 5])
    adverts = fed.setup(threshold=4)
    coordinator = Ed25519PrivateKey.generate()
    victim = fed.devices[1]
    attacks = {
        "unsigned": (lambda n: _forged_advert(n, None), "not signed by a device"),
        "own identity key": (lambda n: _forged_advert(n, coordinator, told=fed.told),
                             "not signed by a device"),
        "peer's identity, own signature": (
            lambda n: _forged_advert(n, coordinator, identity_pk=adverts[n].identity_pk,
                                     told=fed.told),
            "signature does not verify"),
    }
    for name, (forge, match) in attacks.items():
        swapped = dict(adverts)
        for peer in (2, 3, 4, 5):
            swapped[peer] = forge(peer)
        with pytest.raises(wire.SecAggProtocolError, match=match):
            handle_share_keys(wire.ShareKeysRequest(ROUND, swapped).to_record(), victim.context)
        assert _stage(victim) == "setup", name  # nothing sealed, nothing kept
    # the honest list still works afterwards
    handle_share_keys(wire.ShareKeysRequest(ROUND, adverts).to_record(), victim.context)
    assert _stage(victim) == "shared"


def test_sybil_nodes_are_refused() -> None:
    """The coordinator announces more nodes and adds nodes of its own; or relabels a real
    device's advert for a second node id; or a colluding roster device signs adverts for
    two node ids. All are refused."""
    fed = Federation([1, 2, 3], extra_roster=1)
    adverts = fed.setup(threshold=3, num_nodes=4)  # the roster admits 4 devices
    coordinator = Ed25519PrivateKey.generate()
    victim = fed.devices[1].context
    invented = dict(adverts) | {99: _forged_advert(99, coordinator, told=fed.told)}
    with pytest.raises(wire.SecAggProtocolError, match="not signed by a device"):
        handle_share_keys(wire.ShareKeysRequest(ROUND, invented).to_record(), victim)
    relabelled = dict(adverts) | {99: adverts[2]}
    with pytest.raises(wire.SecAggProtocolError, match="public keys repeat"):
        handle_share_keys(wire.ShareKeysRequest(ROUND, relabelled).to_record(), victim)
    colluder = fed.outsiders[0]  # admitted, colluding: signs two nodes' adverts
    twice = dict(adverts) | {98: _forged_advert(98, colluder, told=fed.told),
                             99: _forged_advert(99, colluder, told=fed.told)}
    with pytest.raises(wire.SecAggProtocolError, match="one device's identity"):
        handle_share_keys(wire.ShareKeysRequest(ROUND, twice).to_record(), victim)
    assert _stage(fed.devices[1]) == "setup"


def test_the_setup_must_bring_the_organisations_roster() -> None:
    """A device that pins the organisation key refuses a round without a roster, with a
    roster the coordinator signed, with more nodes than the roster admits, or one that
    does not list it; it keeps no round secret."""
    fed = Federation([1, 2, 3])
    device = fed.devices[1]
    coordinator = Ed25519PrivateKey.generate()
    members = {"device-1": identity_public_key(device.key),
               "fake": identity_public_key(coordinator)}
    self_signed = SignedRoster.sign(Roster.of(members), coordinator).to_text().encode()
    without_me = SignedRoster.sign(Roster.of({
        f"device-{n}": identity_public_key(fed.devices[n].key) for n in (2, 3)}),
        fed.org).to_text().encode()
    cases = {
        "no roster": (wire.SetupRequest(ROUND, SALT, 3, 3), "no signed roster"),
        "forged roster": (wire.SetupRequest(ROUND, SALT, 3, 3, self_signed),
                          "not signed by the organisation key"),
        "more nodes than admitted": (wire.SetupRequest(ROUND, SALT, 4, 4, fed.roster),
                                     "roster admits only 3"),
        "device not admitted": (wire.SetupRequest(ROUND, SALT, 2, 2, without_me),
                                "not in the organisation's roster"),
    }
    for name, (request, match) in cases.items():
        with pytest.raises(wire.SecAggProtocolError, match=match):
            handle_setup(request.to_record(), device.context, fed.ident(1))
        assert STATE_KEY not in device.context.state.config_records, name
    # a device with no pinned key (the honest-but-curious mode) cannot sign for a roster
    with pytest.raises(wire.SecAggProtocolError, match="no organisation key pinned"):
        handle_setup(wire.SetupRequest(ROUND, SALT, 3, 3, fed.roster).to_record(), _context(1))


def test_an_advert_replayed_from_an_earlier_round_is_refused() -> None:
    fed = Federation([1, 2, 3])
    old = fed.setup(threshold=3, round_id=ROUND - 1)
    adverts = fed.setup(threshold=3)
    replayed = dict(adverts) | {2: old[2]}
    with pytest.raises(wire.SecAggProtocolError, match="node 2's advert signature"):
        handle_share_keys(wire.ShareKeysRequest(ROUND, replayed).to_record(),
                          fed.devices[1].context)


def test_a_round_of_the_victim_and_colluders_below_the_rosters_floor_is_refused() -> None:
    """Ten devices admitted; the coordinator tells the victim it is in a round of two with
    one colluding admitted device (t = 2 is then "more than two thirds"), whose advert is
    genuinely signed for that round: their sum minus the colluder's update would be the
    victim's. The organisation's floor (min_nodes, signed into the roster) refuses it at
    setup; a round at the floor goes on."""
    fed = Federation([1], extra_roster=9, min_nodes=5)
    victim = fed.devices[1]
    for threshold, nodes in ((2, 2), (3, 4)):
        with pytest.raises(wire.SecAggProtocolError, match="requires at least 5"):
            handle_setup(wire.SetupRequest(ROUND, SALT, threshold, nodes,
                                           fed.roster).to_record(), victim.context,
                         fed.ident(1))
        assert STATE_KEY not in victim.context.state.config_records
    handle_setup(wire.SetupRequest(ROUND, SALT, 4, 5, fed.roster).to_record(),
                 victim.context, fed.ident(1))


def test_devices_told_different_thresholds_refuse_each_others_adverts() -> None:
    """Honest devices sign the (threshold, node count) they were told: a peer's advert made
    for another threshold does not verify, so a coordinator cannot run one group at t = 3
    of 4 and show the victim a round it believes is t = 4 of 5."""
    fed = Federation([1, 2, 3, 4, 5])
    adverts = fed.setup(threshold=4, num_nodes=5)
    victim_told = wire.SetupRequest(ROUND + 1, SALT, 4, 5, fed.roster).to_record()
    others_told = wire.SetupRequest(ROUND + 1, SALT, 3, 4, fed.roster).to_record()
    split = {n: wire.KeyAdvert.from_record(handle_setup(
        victim_told if n == 1 else others_told, d.context, fed.ident(n)))
        for n, d in fed.devices.items()}
    assert adverts  # (the first setup only made round ROUND + 1 a fresh one)
    with pytest.raises(wire.SecAggProtocolError, match="advert signature does not verify"):
        handle_share_keys(wire.ShareKeysRequest(ROUND + 1, split).to_record(),
                          fed.devices[1].context)


# -- unmasking: the consistency round ------------------------------------------------------


def test_an_authenticated_round_unmasks_only_after_the_consistency_check() -> None:
    fed = Federation([1, 2, 3, 4])
    fed.through_masking(threshold=3)
    everyone = tuple(fed.devices)
    with pytest.raises(wire.SecAggProtocolError, match="after the consistency check"):
        handle_unmask(wire.UnmaskRequest(ROUND, everyone, ()).to_record(),
                      fed.devices[1].context)
    signatures = {n: wire.ConsistencySignature.from_record(handle_consistency(
        wire.ConsistencyRequest(ROUND, everyone).to_record(), d.context, fed.ident(n))).signature
        for n, d in fed.devices.items()}
    with pytest.raises(wire.SecAggProtocolError, match="stage out of order"):  # signs once
        handle_consistency(wire.ConsistencyRequest(ROUND, everyone[:3]).to_record(),
                           fed.devices[1].context, fed.ident(1))
    too_few = dict(itertools.islice(signatures.items(), 2))
    with pytest.raises(wire.SecAggProtocolError, match="fewer than the threshold 3"):
        handle_unmask(wire.UnmaskRequest(ROUND, everyone, (), too_few).to_record(),
                      fed.devices[1].context)
    forged = dict(signatures) | {4: signatures[3]}
    with pytest.raises(wire.SecAggProtocolError, match="node 4's consistency signature"):
        handle_unmask(wire.UnmaskRequest(ROUND, everyone, (), forged).to_record(),
                      fed.devices[1].context)
    reply = wire.UnmaskShares.from_record(handle_unmask(
        wire.UnmaskRequest(ROUND, everyone, (), signatures).to_record(),
        fed.devices[1].context))
    assert set(reply.b_shares) == set(everyone) and not reply.s_shares


def test_split_survivor_lists_reveal_no_node_even_with_a_low_threshold_in_force() -> None:
    """The coordinator tells one group that X survived and the other that X dropped, in the
    consistency round and in the unmask requests. Each device signs one list and unmasks
    only with ``t`` signatures over the list it signed, so for every split the coordinator
    gathers fewer than ``t`` shares of one of X's two secrets, and an unmask request that
    shows one group's signatures to the other is refused."""
    nodes = [1, 2, 3, 4, 5]
    x, others = 1, nodes[1:]
    with_x, without_x = tuple(nodes), tuple(others)
    for size in range(len(others) + 1):
        for told_survived in itertools.combinations(others, size):
            fed = Federation(nodes)
            fed.through_masking(threshold=4)
            lists = {n: with_x if (n == x or n in told_survived) else without_x for n in nodes}
            sigs: dict[tuple[int, ...], dict[int, bytes]] = {with_x: {}, without_x: {}}
            for n, d in fed.devices.items():
                sigs[lists[n]][n] = wire.ConsistencySignature.from_record(handle_consistency(
                    wire.ConsistencyRequest(ROUND, lists[n]).to_record(), d.context,
                    fed.ident(n))).signature
            b_shares: dict[int, bytes] = {}
            s_shares: dict[int, bytes] = {}
            for n, d in fed.devices.items():
                told = lists[n]
                dropped = () if told == with_x else (x,)
                for shown in (sigs[told], sigs[with_x] | sigs[without_x]):
                    request = wire.UnmaskRequest(ROUND, told, dropped, shown).to_record()
                    try:
                        shares = wire.UnmaskShares.from_record(handle_unmask(request, d.context))
                    except wire.SecAggProtocolError:
                        continue
                    b_shares |= {n: shares.b_shares[x]} if x in shares.b_shares else {}
                    s_shares |= {n: shares.s_shares[x]} if x in shares.s_shares else {}
                    break
            assert len(b_shares) < 4 or len(s_shares) < 4, told_survived
            short = b_shares if len(b_shares) < 4 else s_shares
            with pytest.raises(ValueError):
                reconstruct_secrets({x: short}, threshold=4)


# -- SecAgg+: the same attacks on a sparse graph (Bell et al. 2020) ----------------------------

PLUS = [1, 2, 3, 4, 5, 6, 7]  # 4-regular: t = 4 of each neighbourhood of 5


def _graph() -> dict[int, frozenset[int]]:
    from protocols.secagg.graph import neighbourhoods

    return neighbourhoods(PLUS, degree=4, round_id=ROUND, salt=SALT)


def test_secagg_plus_setup_counts_the_threshold_within_a_neighbourhood() -> None:
    """t = 4 of 7 is more than two thirds of a SecAgg+ neighbourhood of 5, t = 3 is not;
    an odd degree is refused by name."""
    ok = wire.SetupRequest(ROUND, SALT, 4, 7, degree=4).to_record()
    assert wire.SetupRequest.from_record(ok).degree == 4
    with pytest.raises(wire.SecAggProtocolError, match="neighbourhood of 5 nodes"):
        wire.SetupRequest.from_record(wire.SetupRequest(ROUND, SALT, 3, 7, degree=4).to_record())
    with pytest.raises(wire.SecAggProtocolError, match="`degree`"):
        wire.SetupRequest.from_record(wire.SetupRequest(ROUND, SALT, 4, 7, degree=3).to_record())


def test_secagg_plus_shares_masks_and_unmasks_only_within_the_neighbourhood() -> None:
    """Each device seals to its 4 neighbours, refuses shares from a non-neighbour at masking,
    and answers an unmask request (global lists, as signed) for its neighbourhood only."""
    fed = Federation(PLUS)
    graph = _graph()
    adverts = fed.setup(threshold=4, degree=4)
    inbox = fed.share(adverts)
    for node in PLUS:
        assert set(inbox[node]) == graph[node]
    stranger = next(n for n in PLUS if n != 1 and n not in graph[1])
    crooked = dict(inbox[1]) | {stranger: inbox[next(iter(graph[stranger]))][stranger]}
    inst = wire.MaskingInstruction(ROUND, crooked, 32, 2.0**20, 0.5)
    with pytest.raises(wire.SecAggProtocolError, match="neighbours"):
        mask_update(np.zeros(DIM, np.float32), RecordDict({wire.RECORD: inst.to_record()}),
                    fed.devices[1].context)
    fed.mask(inbox)
    everyone = tuple(PLUS)
    signatures = {n: wire.ConsistencySignature.from_record(handle_consistency(
        wire.ConsistencyRequest(ROUND, everyone).to_record(), d.context, fed.ident(n))).signature
        for n, d in fed.devices.items()}
    reply = wire.UnmaskShares.from_record(handle_unmask(
        wire.UnmaskRequest(ROUND, everyone, (), signatures).to_record(),
        fed.devices[1].context))
    assert set(reply.b_shares) == graph[1] | {1} and not reply.s_shares


def test_secagg_plus_needs_t_signatures_from_the_neighbourhood() -> None:
    """Signatures of nodes outside a device's neighbourhood do not count towards its t."""
    fed = Federation(PLUS)
    graph = _graph()
    fed.through_masking(threshold=4, degree=4)
    everyone = tuple(PLUS)
    signatures = {n: wire.ConsistencySignature.from_record(handle_consistency(
        wire.ConsistencyRequest(ROUND, everyone).to_record(), d.context, fed.ident(n))).signature
        for n, d in fed.devices.items()}
    outside = [n for n in PLUS if n not in graph[1] | {1}]
    shown = {n: signatures[n] for n in [*outside, 1, *sorted(graph[1])[:2]]}  # 3 of the hood
    with pytest.raises(wire.SecAggProtocolError, match="fewer than the threshold 4"):
        handle_unmask(wire.UnmaskRequest(ROUND, everyone, (), shown).to_record(),
                      fed.devices[1].context)


def test_secagg_plus_devices_told_different_degrees_refuse_each_others_adverts() -> None:
    """A coordinator that tells one device it is in a SecAgg+ round (its secrets with 4
    neighbours) and the others a complete one cannot show it their adverts."""
    fed = Federation(PLUS)
    others_told = wire.SetupRequest(ROUND, SALT, 5, 7, fed.roster, 0).to_record()
    victim_told = wire.SetupRequest(ROUND, SALT, 5, 7, fed.roster, 4).to_record()
    split = {n: wire.KeyAdvert.from_record(handle_setup(
        victim_told if n == 1 else others_told, d.context, fed.ident(n)))
        for n, d in fed.devices.items()}
    with pytest.raises(wire.SecAggProtocolError, match="advert signature does not verify"):
        handle_share_keys(wire.ShareKeysRequest(ROUND, split).to_record(),
                          fed.devices[1].context)


def test_secagg_plus_split_survivor_lists_reveal_no_node() -> None:
    """The split attack of SecAgg on a 4-regular graph of 7: X's shares rest with its
    neighbourhood of 5 and t = 4 of them; whichever of X's neighbours are told X survived,
    the coordinator gathers fewer than t shares of one of X's secrets."""
    x = 1
    hood = sorted(_graph()[x])
    with_x, without_x = tuple(PLUS), tuple(n for n in PLUS if n != x)
    for size in range(len(hood) + 1):
        for told_survived in itertools.combinations(hood, size):
            fed = Federation(PLUS)
            fed.through_masking(threshold=4, degree=4)
            lists = {n: without_x if n in hood and n not in told_survived else with_x
                     for n in PLUS}
            sigs: dict[tuple[int, ...], dict[int, bytes]] = {with_x: {}, without_x: {}}
            for n, d in fed.devices.items():
                try:
                    sigs[lists[n]][n] = wire.ConsistencySignature.from_record(
                        handle_consistency(wire.ConsistencyRequest(ROUND, lists[n]).to_record(),
                                           d.context, fed.ident(n))).signature
                except wire.SecAggProtocolError:
                    continue  # (too few survivors of its neighbourhood on that list)
            b_shares: dict[int, bytes] = {}
            s_shares: dict[int, bytes] = {}
            for n, d in fed.devices.items():
                told = lists[n]
                dropped = () if told == with_x else (x,)
                for shown in (sigs[told], sigs[with_x] | sigs[without_x]):
                    request = wire.UnmaskRequest(ROUND, told, dropped, shown).to_record()
                    try:
                        shares = wire.UnmaskShares.from_record(handle_unmask(request, d.context))
                    except wire.SecAggProtocolError:
                        continue
                    b_shares |= {n: shares.b_shares[x]} if x in shares.b_shares else {}
                    s_shares |= {n: shares.s_shares[x]} if x in shares.s_shares else {}
                    break
            assert len(b_shares) < 4 or len(s_shares) < 4, told_survived
            short = b_shares if len(b_shares) < 4 else s_shares
            with pytest.raises(ValueError):
                reconstruct_secrets({x: short}, threshold=4)


def test_secagg_plus_checks_the_adverts_and_signatures_of_its_own_neighbourhood() -> None:
    """A SecAgg+ device verifies what it relies on, its neighbourhood, so its work stays
    O(log n): a forged advert of a neighbour is refused with nothing sealed, a forged advert of
    a node it never shares with is not its concern (its secrets go to none of them); likewise
    at unmasking a bad signature outside its neighbourhood neither counts nor stops it."""
    fed = Federation(PLUS)
    graph = _graph()
    adverts = fed.setup(threshold=4, degree=4)
    victim = fed.devices[1]
    coordinator = Ed25519PrivateKey.generate()
    neighbour = min(graph[1])
    stranger = next(n for n in PLUS if n != 1 and n not in graph[1])
    forged = dict(adverts) | {neighbour: _forged_advert(neighbour, coordinator, told=fed.told)}
    with pytest.raises(wire.SecAggProtocolError, match="not signed by a device"):
        handle_share_keys(wire.ShareKeysRequest(ROUND, forged).to_record(), victim.context)
    assert _stage(victim) == "setup"
    elsewhere = dict(adverts) | {stranger: _forged_advert(stranger, coordinator, told=fed.told)}
    sealed = wire.SealedShares.from_record(handle_share_keys(
        wire.ShareKeysRequest(ROUND, elsewhere).to_record(), victim.context))
    assert set(sealed.ciphertexts) == graph[1] and stranger not in sealed.ciphertexts

    fed = Federation(PLUS)
    fed.through_masking(threshold=4, degree=4)
    everyone = tuple(PLUS)
    signatures = {n: wire.ConsistencySignature.from_record(handle_consistency(
        wire.ConsistencyRequest(ROUND, everyone).to_record(), d.context, fed.ident(n))).signature
        for n, d in fed.devices.items()}
    bad = b"\x01" * 64
    with pytest.raises(wire.SecAggProtocolError, match=f"node {neighbour}'s consistency"):
        handle_unmask(wire.UnmaskRequest(ROUND, everyone, (), signatures | {neighbour: bad})
                      .to_record(), fed.devices[1].context)
    reply = wire.UnmaskShares.from_record(handle_unmask(
        wire.UnmaskRequest(ROUND, everyone, (), signatures | {stranger: bad}).to_record(),
        fed.devices[1].context))
    assert set(reply.b_shares) == graph[1] | {1}


def test_secagg_plus_needs_only_its_neighbourhoods_adverts_and_every_nodes_id() -> None:
    """The coordinator sends a SecAgg+ device the ids of all of U1 (the graph is computed
    from them) and its neighbourhood's adverts only: that is enough to seal its shares. A
    list without one neighbour's advert is refused with nothing sealed, and adverts of
    nodes the id list leaves out are refused when the request is read."""
    fed = Federation(PLUS)
    graph = _graph()
    adverts = fed.setup(threshold=4, degree=4)
    victim = fed.devices[1]
    hood = graph[1] | {1}
    missing = min(graph[1])
    short = {n: adverts[n] for n in hood - {missing}}
    with pytest.raises(wire.SecAggProtocolError, match=f"neighbours \\[{missing}\\]"):
        handle_share_keys(wire.ShareKeysRequest(ROUND, short, tuple(PLUS)).to_record(),
                          victim.context)
    assert _stage(victim) == "setup"
    stranger = next(n for n in PLUS if n not in hood)
    with pytest.raises(wire.SecAggProtocolError, match=f"\\[{stranger}\\]"):
        wire.ShareKeysRequest.from_record(wire.ShareKeysRequest(
            ROUND, {n: adverts[n] for n in PLUS},
            tuple(n for n in PLUS if n != stranger)).to_record())
    sealed = wire.SealedShares.from_record(handle_share_keys(wire.ShareKeysRequest(
        ROUND, {n: adverts[n] for n in hood}, tuple(PLUS)).to_record(), victim.context))
    assert set(sealed.ciphertexts) == graph[1]
    state = RoundSecrets.load(victim.context, round_id=ROUND, stage="shared")
    assert state.members == PLUS and {int(n) for n in state.mask_pks} == hood
