"""Secure aggregation on Flower's Message API: the coordinator only ever sees the sum.

:class:`SecAggFedAvg` is :class:`~server.strategy.AdapterFedAvg` with the train round
replaced by SecAgg (Bonawitz et al., CCS 2017) run as four message exchanges driven from
the strategy (wire formats in :mod:`protocols.secagg.wire`, client side in
:mod:`client.secagg_client`):

1. ``configure_train`` samples nodes as FedAvg does, then runs *setup* (each node makes two
   key pairs) and *share keys* (each node Shamir-shares its self-mask seed and mask key,
   sealed to each peer) through the grid, and returns the train messages, each carrying the
   global adapter and the shares sealed to that node;
2. the clients train and reply with their masked, fixed-point update (the Strategy loop's
   ordinary train exchange);
3. ``aggregate_train`` asks the survivors to *unmask*, reconstructs the self masks of the
   survivors and the pairwise masks of the dropped, and decodes the sum.

With a signed roster (``roster``) the round is *authenticated* (the active-adversary variant
of Bonawitz et al. §6, :mod:`protocols.secagg.identity`): the setup carries the roster, each
advert the device's identity-key signature (checked here too, so one bad advert is dropped
instead of making every honest device refuse the key list), and a *consistency* exchange,
in which the survivors sign the survivor list, precedes unmasking; the unmask request
carries those signatures. Devices that pin the organisation key refuse anything else.

The aggregate is the uniform mean of the survivors' updates within the fixed-point error
(``n · 0.5 / scale`` per coordinate): exact aggregation of FFA-LoRA's B (or of any uploaded
tensors). The coordinator cannot weight updates it cannot see, so averaging is uniform
(every client trains the same number of examples per round here).

With ``neighbours`` = k > 0 the round is SecAgg+ (Bell et al., CCS 2020): after the adverts
the coordinator and every client compute the same k-regular graph over the nodes that
advertised (:mod:`protocols.secagg.graph`); each node's shares go to, and its pairwise masks
are agreed with, its k neighbours only, and the threshold counts within a neighbourhood of
k + 1 nodes. Client work per round drops from O(n) pairwise masks to O(k); the coordinator
reconstructs each survivor's self-mask seed and each dropped node's mask key from that
node's neighbours' shares. A round in which some node keeps fewer than t holders of its
shares is abandoned, as a round with fewer than t survivors is in SecAgg.

Why not Flower's ``SecAggPlusWorkflow``: it runs only on the legacy ``Driver``/workflow API,
not with the Message-API strategies, and derives masks from a 32-bit fold of the seed into
numpy's Mersenne Twister (docs/architecture.md, "Decisions and why").

With client-level DP (``dp_clip_norm``/``dp_noise_multiplier``), clipping and noise move to
the clients: each clips to ``C`` and adds ``N(0, (σC)²/t)`` so the sum over the ≥ ``t``
survivors carries at least std ``σC`` — what :class:`~server.client_dp.ClientLevelDP`
accounts in its ledger, and what no party sees without. ``t`` is the complete graph's
threshold also under SecAgg+ (whose per-neighbourhood threshold would multiply the noise by
``n/t``), and a DP round with fewer survivors is abandoned. Quantized uploads add Skellam
noise to their integers instead (:mod:`protocols.secagg.integer_noise`). Each client's
contribution is bounded by the fixed-point range per coordinate; individual updates cannot be
validated beyond that (that is the point), so a malformed masked input is treated as a dropout.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from protocols import keys
from protocols.adapter_spec import AdapterSpec
from protocols.codecs import apply_delta, record_nbytes
from protocols.errors import InvalidUpdate
from protocols.secagg import (
    decode_sum,
    dropped_pair_seeds,
    min_threshold,
    reconstruct_secrets,
    remove_masks,
    wire,
)
from protocols.secagg.fixed_point import (
    QUANTIZED_LEVELS,
    quantized_modulus_bits,
    quantized_scale,
)
from protocols.secagg.graph import check_degree, is_complete, neighbourhood_size, neighbourhoods
from protocols.secagg.identity import (
    SignedRoster,
    consistency_message,
    verify_signature,
)
from protocols.secagg.integer_noise import plan_integer_noise
from protocols.secagg.unmask import MaskedSum
from server.strategy import (
    AdapterFedAvg,
    RoundStats,
    claims_edge,
    content_nbytes,
    last_reply_at,
    reply_metrics,
    stale_reply,
)

log = logging.getLogger(__name__)

#: SecAgg round ids are ``ROUND_ID_STRIDE * server_round + attempt``.
ROUND_ID_STRIDE = 1000


@dataclass
class _Round:
    """The coordinator's view of one SecAgg round in progress."""

    round_id: int  # unique per attempt: a retried round (server.round_retry) gets a new one
    server_round: int
    salt: bytes
    threshold: int
    num_nodes: int  # announced at setup
    degree: int = 0  # SecAgg+ graph degree announced at setup (0: complete graph)
    # Survivors the distributed DP noise is split over: the complete graph's threshold (in
    # SecAgg+, where t counts within a neighbourhood, splitting over t would add n/t times
    # the noise needed); a DP round with fewer survivors is abandoned.
    noise_survivors: int = 0
    graph: dict[int, frozenset[int]] = field(default_factory=dict)  # over U1
    adverts: dict[int, wire.KeyAdvert] = field(default_factory=dict)  # U1
    senders: set[int] = field(default_factory=set)  # U2: shared keys
    instruction: dict[int, wire.MaskingInstruction] = field(default_factory=dict)
    noise_bound: int = 0  # of the summed integer noise (quantized uploads with DP)

    def hood(self, node: int) -> frozenset[int]:
        """``node``'s neighbourhood on the round's graph, itself included: the nodes that
        hold its shares and whose adverts and signatures it checks (all of U1 in SecAgg)."""
        return self.graph[node] | {node}


class SecAggFedAvg(AdapterFedAvg):
    """Uniform FedAvg of adapter updates under secure aggregation."""

    def __init__(
        self,
        spec: AdapterSpec,
        *,
        threshold_fraction: float = 0.66,
        clip_range: float = 0.5,
        modulus_bits: int = 32,
        dp_clip_norm: float = 0.0,
        dp_noise_multiplier: float = 0.0,
        roster: str = "",
        quant_range: float = 0.0,
        neighbours: int = 0,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(spec, weighting="uniform", **fedavg_kwargs)
        if not 0.0 < threshold_fraction <= 1.0:
            raise ValueError(f"threshold_fraction must be in (0, 1], got {threshold_fraction}")
        if (dp_clip_norm > 0) != (dp_noise_multiplier > 0):
            raise ValueError("distributed DP needs both dp_clip_norm and dp_noise_multiplier")
        check_degree(neighbours)  # 0 (SecAgg) or even >= 2 (SecAgg+)
        self.neighbours = neighbours
        self.threshold_fraction = threshold_fraction
        self.clip_range = clip_range
        self.modulus_bits = modulus_bits
        # A lossy integer codec (int8 / int4 / int2) quantizes inside the masks: codes in
        # [-levels, levels] over [-quant_range, quant_range], summed in a small modulus.
        self.levels = QUANTIZED_LEVELS.get(self.codec_name, 0)
        if self.codec_name not in ("fp32", *QUANTIZED_LEVELS):
            raise ValueError(f"codec {self.codec_name!r} cannot run inside secure aggregation; "
                             f"use fp32 or one of {sorted(QUANTIZED_LEVELS)}")
        if self.levels and not (math.isfinite(quant_range) and quant_range > 0):
            raise ValueError(f"a quantized codec needs quant_range > 0, got {quant_range}")
        self.quant_range = quant_range
        self.dp_clip_norm = dp_clip_norm
        self.dp_noise_multiplier = dp_noise_multiplier
        # The coordinator relays the roster; devices check the organisation's signature.
        self._roster_bytes = roster.encode()  # as relayed in every setup
        self._roster = SignedRoster.from_text(roster).unverified() if roster else None
        self._secagg: _Round | None = None
        self._last_round_id = 0
        self._layout = [(k, spec.tensors[k].shape) for k in sorted(spec.trainable_keys)]
        self.vector_length = sum(int(np.prod(shape)) for _, shape in self._layout)

    def degree(self, num_nodes: int) -> int:
        """The SecAgg+ degree announced for a round of ``num_nodes``: 0 (the complete graph)
        when the configured degree leaves no node out."""
        return 0 if is_complete(num_nodes, self.neighbours) else self.neighbours

    def threshold(self, num_nodes: int) -> int:
        """``ceil(threshold_fraction * n)``, but never two thirds of the nodes or fewer: the
        clients refuse that (:func:`protocols.secagg.min_threshold`). In SecAgg+, ``n`` is
        one neighbourhood: the degree + 1 nodes that hold one node's shares."""
        size = neighbourhood_size(num_nodes, self.degree(num_nodes))
        return max(min_threshold(size), math.ceil(self.threshold_fraction * size))

    def next_round_id(self, server_round: int) -> int:
        """A SecAgg round id for an attempt at ``server_round``: ``1000 * round + attempt``,
        always above the last one (devices refuse a setup for a round they already
        started, and a retried round runs the stages again)."""
        self._last_round_id = max(self._last_round_id + 1, ROUND_ID_STRIDE * server_round)
        return self._last_round_id

    # -- stages 0-1, then the train messages --------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._secagg = None
        plain = list(super().configure_train(server_round, arrays, config, grid))
        stats = self.stats[server_round]
        if not plain:
            return []
        started = time.perf_counter()
        nodes = [m.metadata.dst_node_id for m in plain]
        if len(nodes) < 2:
            log.warning("round %d: secure aggregation needs >= 2 clients, %d sampled; "
                        "round skipped", server_round, len(nodes))
            return []
        # A sampled node the roster does not list (still connected, but not admitted) cannot
        # sign an advert: the announced count never exceeds the devices the roster admits.
        announced = (min(len(nodes), len(self._roster.members)) if self._roster
                     else len(nodes))
        rnd = _Round(round_id=self.next_round_id(server_round), server_round=server_round,
                     salt=os.urandom(wire.SALT_BYTES), threshold=self.threshold(announced),
                     num_nodes=announced, degree=self.degree(announced),
                     noise_survivors=max(min_threshold(announced),
                                         math.ceil(self.threshold_fraction * announced)))
        setup = wire.SetupRequest(rnd.round_id, rnd.salt, rnd.threshold, announced,
                                  self._roster_bytes, rnd.degree)
        for node, content in self._exchange(
            stats, {n: setup.to_record() for n in nodes}, wire.SETUP, server_round
        ).items():
            try:
                advert = wire.KeyAdvert.from_record(content)
                if self._roster:
                    self._check_advert(rnd, node, advert)
                rnd.adverts[node] = advert
            except wire.SecAggProtocolError as bad:
                stats.reject(server_round, node, bad.reason)
        if not self._enough(rnd, len(rnd.adverts), server_round, "advertised keys"):
            return []

        rnd.graph = neighbourhoods(rnd.adverts, degree=rnd.degree, round_id=rnd.round_id,
                                   salt=rnd.salt)
        if not self._holders_enough(rnd, set(rnd.adverts), server_round, "advertised keys"):
            return []
        inbox: dict[int, dict[int, bytes]] = {n: {} for n in rnd.adverts}
        for node, content in self._exchange(
            stats, self._share_keys_requests(rnd), wire.SHARE_KEYS, server_round
        ).items():
            try:
                sealed = wire.SealedShares.from_record(content)
                if set(sealed.ciphertexts) != rnd.graph[node]:
                    raise wire.SecAggProtocolError(
                        "shares must be sealed to every other node" if not rnd.degree else
                        "shares must be sealed to exactly the node's neighbours")
            except wire.SecAggProtocolError as bad:
                stats.reject(server_round, node, bad.reason)
                continue
            rnd.senders.add(node)
            for receiver, text in sealed.ciphertexts.items():
                inbox[receiver][node] = text
        if not self._enough(rnd, len(rnd.senders), server_round, "shared keys"):
            return []
        if not self._holders_enough(rnd, rnd.senders, server_round, "shared keys"):
            return []

        noise_std = 0.0
        clip_range = self.clip_range
        rounding_bound = skellam_variance = 0.0
        if self.dp_noise_multiplier > 0 and not self.levels:
            noise_std = (self.dp_noise_multiplier * self.dp_clip_norm
                         / math.sqrt(rnd.noise_survivors))
            clip_range = max(clip_range, self.dp_clip_norm + 6.0 * noise_std)
        modulus_bits = self.modulus_bits
        if self.levels and self.dp_noise_multiplier > 0:
            # DP on a quantized upload: integer (Skellam) noise after rounding.
            plan = plan_integer_noise(
                num_clients=len(rnd.senders), threshold=rnd.noise_survivors,
                dim=self.vector_length, clip_norm=self.dp_clip_norm,
                noise_multiplier=self.dp_noise_multiplier, quant_range=self.quant_range,
                levels=self.levels)
            scale, clip_range, modulus_bits = plan.scale, plan.clip_range, plan.modulus_bits
            rounding_bound, skellam_variance = plan.rounding_bound, plan.per_client_variance
            rnd.noise_bound = plan.noise_bound
        elif self.levels:
            clip_range = self.quant_range
            modulus_bits = quantized_modulus_bits(len(rnd.senders), self.levels)
            scale = quantized_scale(self.levels, clip_range)
        else:
            scale = wire.fixed_point_scale(num_clients=len(rnd.senders), clip_range=clip_range,
                                           modulus_bits=modulus_bits)
        contents = {m.metadata.dst_node_id: m.content for m in plain}
        messages = []
        for node in sorted(rnd.senders):
            inst = wire.MaskingInstruction(
                round_id=rnd.round_id,
                ciphertexts={s: inbox[node][s] for s in rnd.senders & rnd.graph[node]},
                modulus_bits=modulus_bits, scale=scale, clip_range=clip_range,
                dp_clip_norm=self.dp_clip_norm if self.dp_noise_multiplier else 0.0,
                dp_noise_std=noise_std, levels=self.levels, rounding_bound=rounding_bound,
                skellam_variance=skellam_variance,
            )
            rnd.instruction[node] = inst
            # Every array record of the node's instruction: the adapter, and the last step
            # of edge.subspace = 'trajectory' (edge devices train along it, masked dense).
            template = contents[node]
            content = RecordDict({**dict(template.array_records.items()),
                                  keys.CONFIG: template.config_records[keys.CONFIG],
                                  wire.RECORD: inst.to_record()})
            messages.append(Message(content=content, dst_node_id=node,
                                    message_type="train", group_id=str(server_round)))
        # The train payload already counted by FedAvg's stats covers the adapter; add ours.
        stats.bytes_down += sum(content_nbytes(RecordDict({wire.RECORD: i.to_record()}))
                                for i in rnd.instruction.values())
        stats.sampled = len(nodes)
        stats.sent = messages
        stats.protocol_seconds += time.perf_counter() - started
        self._secagg = rnd
        return messages

    # -- stage 3 and the sum --------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.replies_at = time.perf_counter()
        rnd = self._secagg
        if rnd is None or rnd.server_round != server_round:
            log.warning("round %d: no secure-aggregation round in progress; replies ignored",
                        server_round)
            stats.aggregated_at = time.perf_counter()
            return None, None
        self._secagg = None  # a late second call must not unmask again
        # Each accepted upload is folded into one running sum mod 2**m as it is read and then
        # dropped: memory stays one vector whatever the number of clients (issue 18).
        folded = MaskedSum(modulus_bits=next(iter(rnd.instruction.values())).modulus_bits,
                           length=self.vector_length)
        metrics: dict[int, MetricRecord] = {}
        sizes: dict[int, int] = {}
        answered: set[int] = set()
        for msg in replies:  # one at a time: a grid that yields replies is never held whole
            node = stats.node_of(msg)
            answered.add(node)
            if (stale := stale_reply(msg, server_round)) is not None:
                stats.reject(server_round, node, stale)
                continue
            if msg.has_error():
                stats.fail(server_round, node, msg.error.reason)
                continue
            if node not in rnd.senders or node in metrics:
                stats.reject(server_round, node, "reply from a node not in this round")
                continue
            try:
                vector = wire.read_masked(
                    msg.content, length=self.vector_length,
                    modulus_bits=rnd.instruction[node].modulus_bits)
                reported = reply_metrics(msg.content, {wire.MASKED, keys.METRICS})
                size = record_nbytes(msg.content.array_records[wire.MASKED])
                self.charge_upload(node, size, commit=False)
                stats.count_upload(reported, content_nbytes(msg.content))
            except (wire.SecAggProtocolError, InvalidUpdate) as bad:
                stats.reject(server_round, node, bad.reason)
                stats.bytes_up += content_nbytes(msg.content)
                continue
            folded.add(node, vector)
            del vector
            metrics[node], sizes[node] = reported, size
            stats.bytes_up += content_nbytes(msg.content)
        stats.replies_at = last_reply_at(replies, stats.replies_at)
        stats.fail_unanswered(server_round, answered)
        started = time.perf_counter()
        total = self._unmask(rnd, folded, stats, server_round)
        stats.protocol_seconds += time.perf_counter() - started
        stats.accepted = len(folded.nodes) if total is not None else 0
        if total is None:
            stats.aggregated_at = time.perf_counter()
            return None, None
        for node in folded.nodes:  # a lost round (retried) costs no device its run budget
            self.charge_upload(node, sizes[node])
        merged = apply_delta(self._global,
                             self._split(total / (self.denominator or len(folded.nodes))))
        merged = self.take_step(server_round, merged,
                                [n for n in folded.nodes if claims_edge(metrics[n])], stats)
        stats.aggregated_at = time.perf_counter()
        return self.publish(merged), stats.summarise(metrics[n] for n in folded.nodes)

    def _unmask(
        self, rnd: _Round, folded: MaskedSum, stats: RoundStats, server_round: int
    ) -> np.ndarray | None:
        """The float64 sum of the survivors' updates, or ``None`` if the round is lost."""
        arrived = len(folded.nodes)
        if not self._enough(rnd, arrived, server_round, "sent masked inputs"):
            return None
        if self.dp_noise_multiplier > 0 and arrived < rnd.noise_survivors:
            stats.abandoned = (f"only {arrived} nodes sent masked inputs, fewer than the "
                               f"{rnd.noise_survivors} the DP noise was split over")
            log.warning("round %d: only %d nodes sent masked inputs, fewer than the %d the "
                        "distributed DP noise was split over; the round is abandoned and the "
                        "global adapter is unchanged", server_round, arrived,
                        rnd.noise_survivors)
            return None
        survivors = sorted(folded.nodes)
        dropped = sorted(rnd.senders - set(folded.nodes))
        stats.dropped = len(dropped)
        if not self._holders_enough(rnd, set(survivors), server_round,
                                    "sent masked inputs", owners=rnd.senders):
            return None
        signatures: dict[int, bytes] = {}
        if self._roster:
            signatures = self._consistency(rnd, survivors, stats, server_round)
            if not (self._enough(rnd, len(signatures), server_round, "signed the survivor list")
                    and self._holders_enough(rnd, set(signatures), server_round,
                                             "signed the survivor list", owners=rnd.senders)):
                return None
        holders = sorted(signatures) if self._roster else survivors
        b_by_owner: dict[int, dict[int, bytes]] = {v: {} for v in survivors}
        s_by_owner: dict[int, dict[int, bytes]] = {d: {} for d in dropped}
        for holder, content in self._exchange(
            stats, self._unmask_requests(rnd, holders, survivors, dropped, signatures),
            wire.UNMASK, server_round, count_failures=False,
        ).items():
            hood = rnd.hood(holder)  # whose shares the holder has
            try:
                shares = wire.UnmaskShares.from_record(content)
                if (set(shares.b_shares) != hood & set(survivors)
                        or set(shares.s_shares) != hood & set(dropped)):
                    raise wire.SecAggProtocolError("shares do not match the request")
            except wire.SecAggProtocolError as bad:
                stats.reject(server_round, holder, bad.reason)
                continue
            for owner, share in shares.b_shares.items():
                b_by_owner[owner][holder] = share
            for owner, share in shares.s_shares.items():
                s_by_owner[owner][holder] = share
        try:
            b_seeds = reconstruct_secrets(b_by_owner, threshold=rnd.threshold)
            mask_keys = reconstruct_secrets(s_by_owner, threshold=rnd.threshold)
            pair_seeds = dropped_pair_seeds(
                dropped_mask_keys=mask_keys,
                mask_public_keys={n: a.mask_pk for n, a in rnd.adverts.items()},
                neighbours={d: rnd.graph[d] & rnd.senders for d in dropped},
                survivors=survivors,
                round_id=rnd.round_id, salt=rnd.salt,
            )
            inst = rnd.instruction[survivors[0]]
            unmasked = remove_masks(folded.total,
                                    self_seeds=b_seeds, dropped_pair_seeds=pair_seeds,
                                    modulus_bits=inst.modulus_bits)
            total = decode_sum(unmasked, scale=inst.scale, clip=inst.clip_range,
                               modulus_bits=inst.modulus_bits, num_clients=len(survivors),
                               noise_bound=rnd.noise_bound)
        except (ValueError, TypeError) as exc:
            log.warning("round %d: secure aggregation could not recover the sum (%s); "
                        "the global adapter is unchanged", server_round, exc)
            return None
        log.info("round %d: secure sum of %d updates (%d dropped after sharing keys)",
                 server_round, len(survivors), len(dropped))
        return total.astype(np.float64)

    # -- authentication (rounds with a roster) -----------------------------------------------
    def _check_advert(self, rnd: _Round, node: int, advert: wire.KeyAdvert) -> None:
        """Drop an advert no roster member signed for this round and node, or a second
        node of one device: every honest device would refuse a key list carrying it."""
        if self._roster is None or advert.identity_pk not in self._roster.keys:
            raise wire.SecAggProtocolError("advert not signed by a device of the roster")
        if any(a.identity_pk == advert.identity_pk for a in rnd.adverts.values()):
            raise wire.SecAggProtocolError("a second node with one device's identity key")
        if not advert.is_signed_for(round_id=rnd.round_id, salt=rnd.salt,
                                    threshold=rnd.threshold, num_nodes=rnd.num_nodes,
                                    node_id=node, degree=rnd.degree):
            raise wire.SecAggProtocolError("advert signature does not verify")

    def _consistency(self, rnd: _Round, survivors: list[int], stats: RoundStats,
                     server_round: int) -> dict[int, bytes]:
        """The survivors' valid signatures over the survivor list (Bonawitz §6, round 3)."""
        request = wire.ConsistencyRequest(rnd.round_id, tuple(survivors)).to_record()
        message = consistency_message(round_id=rnd.round_id, salt=rnd.salt,
                                      threshold=rnd.threshold, num_nodes=rnd.num_nodes,
                                      survivors=survivors)
        signatures: dict[int, bytes] = {}
        for node, content in self._exchange(
            stats, {n: request for n in survivors}, wire.CONSISTENCY, server_round,
            count_failures=False,
        ).items():
            try:
                signature = wire.ConsistencySignature.from_record(content).signature
                if not verify_signature(rnd.adverts[node].identity_pk, signature, message):
                    raise wire.SecAggProtocolError("consistency signature does not verify")
            except wire.SecAggProtocolError as bad:
                stats.reject(server_round, node, bad.reason)
                continue
            signatures[node] = signature
        return signatures

    # -- per-node requests -------------------------------------------------------------------
    # On the complete graph every node gets the same request (one record, shared). In SecAgg+
    # a node needs only its neighbourhood's adverts and signatures, which it alone checks;
    # sending everyone's to everyone made the traffic, the coordinator's memory in a stage
    # and each node's parsing grow with n² (5 / 62 / 368 MB at 100 / 400 / 1,000 clients in
    # the aggregate step before; issue 18).
    def _share_keys_requests(self, rnd: _Round) -> dict[int, RecordDict]:
        nodes = list(rnd.adverts)
        if is_complete(len(nodes), rnd.degree):
            shared = wire.ShareKeysRequest(rnd.round_id, rnd.adverts).to_record()
            return dict.fromkeys(nodes, shared)
        members = tuple(nodes)
        return {n: wire.ShareKeysRequest(
                    rnd.round_id, {h: rnd.adverts[h] for h in sorted(rnd.hood(n))},
                    members).to_record()
                for n in nodes}

    def _unmask_requests(self, rnd: _Round, holders: Sequence[int], survivors: Sequence[int],
                         dropped: Sequence[int],
                         signatures: Mapping[int, bytes]) -> dict[int, RecordDict]:
        if is_complete(len(rnd.adverts), rnd.degree):
            shared = wire.UnmaskRequest(rnd.round_id, tuple(survivors), tuple(dropped),
                                        signatures).to_record()
            return dict.fromkeys(holders, shared)
        return {n: wire.UnmaskRequest(
                    rnd.round_id, tuple(survivors), tuple(dropped),
                    {s: signatures[s] for s in sorted(rnd.hood(n)) if s in signatures},
                ).to_record()
                for n in holders}

    # -- helpers ----------------------------------------------------------------------------
    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The flat mean delta as the adapter's trainable tensors (kept in float64: it is
        rounded once, when added to the global adapter)."""
        out: dict[str, np.ndarray] = {}
        offset = 0
        for key, shape in self._layout:
            size = int(np.prod(shape))
            out[key] = flat[offset:offset + size].reshape(shape)
            offset += size
        return out

    def _holders_enough(self, rnd: _Round, present: set[int], server_round: int, what: str,
                        *, owners: Iterable[int] | None = None) -> bool:
        """Whether every node of ``owners`` (default: ``present``) still has ``t`` holders of
        its shares among ``present`` (its neighbours and itself): what each client checks
        and what reconstructing its secrets needs. Always true on the complete graph once
        ``len(present) >= t``; in SecAgg+ one neighbourhood can fall short alone."""
        if not rnd.degree:
            return True
        for node in sorted(present if owners is None else owners):
            count = len(rnd.hood(node) & present)
            if count < rnd.threshold:
                self.stats[server_round].abandoned = (
                    f"node {node}: only {count} nodes of its neighbourhood {what}, below the "
                    f"threshold {rnd.threshold}")
                log.warning(
                    "round %d: only %d nodes of node %d's SecAgg+ neighbourhood %s, below the "
                    "SecAgg threshold %d; the round is abandoned and the global adapter is "
                    "unchanged", server_round, count, node, what, rnd.threshold)
                return False
        return True

    def _enough(self, rnd: _Round, count: int, server_round: int, what: str) -> bool:
        if count >= rnd.threshold:
            return True
        self.stats[server_round].abandoned = (
            f"only {count} nodes {what}, below the threshold {rnd.threshold}")
        log.warning("round %d: only %d nodes %s, below the SecAgg threshold %d; the round is "
                    "abandoned and the global adapter is unchanged", server_round, count, what,
                    rnd.threshold)
        return False

