"""Adapter-aware federated averaging: validate every reply, then example-weighted FedAvg.

Built on Flower's ``FedAvg`` (sampling, messaging, the ``start`` loop) and changing only the
train aggregation, so other features build on this strategy without editing it: client-level
DP (:mod:`server.client_dp`) wraps it the way Flower's DP wrappers wrap any strategy, and
secure aggregation (:mod:`server.secagg`) subclasses it.

Why not Flower's ``aggregate_arrayrecords``: it trusts replies (a NaN or a reshaped tensor
poisons the global adapter or raises mid-round) and assumes every array is uploaded, while
clients upload only trainable tensors (FFA-LoRA keeps A frozen).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from protocols import keys
from protocols.adapter_rank import (
    adapter_rank,
    aggregate_products,
    is_a,
    pad_rank,
    slice_rank,
    spec_at_rank,
)
from protocols.adapter_spec import AdapterSpec, Tensors, TensorsView
from protocols.codecs import (
    RoundContext,
    apply_delta,
    decode_upload,
    from_record,
    get_codec,
    is_fp32_upload,
    record_nbytes,
    to_record,
)
from protocols.errors import InvalidUpdate
from protocols.packing import is_packed, pack_record, unpack_record, unpack_views
from protocols.records import get_float, get_int, get_str
from protocols.seed_updates import SEED_CODEC_NAME
from protocols.validation import (
    clip_update,
    update_norm,
    validate_kind_reply,
    validate_line_search,
    validate_metrics,
    validate_update,
)
from server.kind_sampling import KindSample, sample_by_kind

log = logging.getLogger(__name__)


def claims_edge(metrics: MetricRecord) -> bool:
    """Whether a reply says it comes from an edge (forward-only) device: a claim, used only
    for statistics and for what the device is sent, never for how its update is weighed."""
    flag = metrics.get(keys.EDGE_CLIENT, 0.0)
    return isinstance(flag, int | float) and flag > 0


@dataclass
class RoundStats:
    """What happened in one round, for the metrics log and the benchmark."""

    sampled: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    dropped: int = 0  # SecAgg: shared keys, then sent no (valid) masked input
    bytes_down: int = 0
    bytes_up: int = 0
    clipped: int = 0  # accepted updates that client-level DP's clipping scaled down
    retries: int = 0  # attempts added because every device of the round failed
    started: float = 0.0
    replies_at: float = 0.0
    aggregated_at: float = 0.0
    protocol_seconds: float = 0.0  # coordinator time in SecAgg stages
    client_train_seconds: list[float] = field(default_factory=list)
    train_loss: float | None = None
    bytes_up_by_kind: dict[str, int] = field(default_factory=dict)  # "edge" / "torch"
    clients_by_kind: dict[str, int] = field(default_factory=dict)
    train_s_by_kind: dict[str, float] = field(default_factory=dict)  # clients' own seconds
    #: edge.subspace = 'trajectory': each replayed edge update as a multiple s of the last
    #: step (its update is s·Δ): how far each edge device chose to go on (< 0: back)
    along_last_step: list[float] = field(default_factory=list)
    #: edge.line_search: the multiple of the aggregated step that was applied, and how many
    #: edge devices' losses chose it (None: no line search this round)
    line_search_multiple: float | None = None
    line_search_judges: int = 0
    #: edge.line_search_momentum: the multiple of the last step added (None: not searched)
    line_search_momentum: float | None = None
    #: the line search's traffic: what its judges were sent and what they answered
    judge_bytes_down: int = 0
    judge_bytes_up: int = 0
    #: edge.role = 'judge' / edge.judges: devices asked their kind while sampling, and the
    #: edge devices drawn to judge without training
    kinds_asked: int = 0
    judges_drawn: int = 0

    def count_upload(self, metrics: MetricRecord, nbytes: int) -> None:
        """Attribute an accepted upload, and the training seconds its device reports, to
        its client kind (a metric the client reports)."""
        kind = "edge" if claims_edge(metrics) else "torch"
        self.bytes_up_by_kind[kind] = self.bytes_up_by_kind.get(kind, 0) + nbytes
        self.clients_by_kind[kind] = self.clients_by_kind.get(kind, 0) + 1
        seconds = metrics.get(keys.TRAIN_SECONDS)
        if isinstance(seconds, int | float):
            self.train_s_by_kind[kind] = self.train_s_by_kind.get(kind, 0.0) + float(seconds)

    rejections: list[str] = field(default_factory=list)
    abandoned: str | None = None  # why a secure-aggregation round ended without a sum
    sent: list[Message] = field(default_factory=list)  # the round's train messages
    _destinations_of: tuple[list[Message], dict[str, int]] | None = field(
        default=None, repr=False, compare=False)

    def fail(self, server_round: int, node: int, reason: str | None) -> None:
        """A client that answered with an error, or not at all."""
        self.failed += 1
        log.warning("round %d: node %d failed: %s", server_round, node, reason)

    def node_of(self, reply: Message, sent: Iterable[Message] | None = None) -> int:
        """The node a reply answers for: the destination of the message it replies to.
        (An error reply the SuperLink writes for an unreachable node does not carry that
        node as its source.) Message ids exist once Flower pushed the messages."""
        return self._destinations(self.sent if sent is None else sent).get(
            reply.metadata.reply_to_message_id or "", reply.metadata.src_node_id)

    def _destinations(self, sent: Iterable[Message]) -> dict[str, int]:
        """Message id -> destination node of ``sent``, built once per list (a round's
        replies look it up one by one: rebuilding it per reply cost O(n²) at n clients)."""
        cached = self._destinations_of
        if cached is not None and cached[0] is sent:
            return cached[1]
        ids = {m.metadata.message_id: m.metadata.dst_node_id for m in sent
               if m.metadata.message_id}
        if ids and isinstance(sent, list):  # ids exist once pushed; a list is not consumed
            self._destinations_of = (sent, ids)
        return ids

    def fail_silent(self, server_round: int, replies: Iterable[Message],
                    sent: Iterable[Message] | None = None, *, stage: str = "train") -> None:
        """Count every node that was sent a message and never answered as failed."""
        sent = list(self.sent if sent is None else sent)
        self.fail_unanswered(server_round, {self.node_of(r, sent) for r in replies}, sent,
                             stage=stage)

    def fail_unanswered(self, server_round: int, answered: set[int],
                        sent: Iterable[Message] | None = None, *, stage: str = "train") -> None:
        """Count every node that was sent a message and is not in ``answered`` as failed."""
        sent = list(self.sent if sent is None else sent)
        for node in sorted({m.metadata.dst_node_id for m in sent} - answered):
            self.fail(server_round, node, f"no {stage} reply before the timeout")

    def reject(self, server_round: int, node: int, reason: str) -> None:
        """A reply that broke the protocol or failed validation: one log line naming the
        node and the reason; nothing of it reaches the aggregate."""
        self.rejected += 1
        self.rejections.append(f"node {node}: {reason}")
        log.warning("round %d: rejected update from node %d: %s", server_round, node, reason)

    def summarise(self, metrics: Iterable[MetricRecord]) -> MetricRecord:
        """The round's training metrics from the accepted clients' own: examples summed,
        loss example-weighted, client seconds kept for the log."""
        metrics = list(metrics)
        losses: list[tuple[float, int]] = []
        for m in metrics:
            count = get_int(m, keys.NUM_EXAMPLES)
            if keys.TRAIN_LOSS in m:
                losses.append((get_float(m, keys.TRAIN_LOSS), count))
            if keys.TRAIN_SECONDS in m:
                self.client_train_seconds.append(get_float(m, keys.TRAIN_SECONDS))
        out = MetricRecord({keys.NUM_EXAMPLES: sum(get_int(m, keys.NUM_EXAMPLES)
                                                   for m in metrics)})
        if losses:
            self.train_loss = float(np.average([x for x, _ in losses],
                                               weights=[c for _, c in losses]))
            out[keys.TRAIN_LOSS] = self.train_loss
        return out


def along(delta: TensorsView, step: TensorsView) -> float:
    """``s`` with ``delta`` = s·``step`` (the least-squares multiple; 0 for a zero step)."""
    dot = sum(float(np.vdot(delta[k], step[k])) for k in step if k in delta)
    norm = sum(float(np.vdot(v, v)) for v in step.values())
    return dot / norm if norm else 0.0


def _send_packed(messages: list[Message], arrays: ArrayRecord) -> ArrayRecord:
    """Give every instruction the adapter as one packed array (see protocols.packing: Flower
    moves each array chunk as its own HTTPS request); returns the packed record."""
    packed = pack_record(arrays)
    for msg in messages:
        msg.content[keys.ARRAYS] = packed
    return packed


def stale_reply(msg: Message, server_round: int) -> str | None:
    """Why a reply does not belong to this round, or None if it does.

    Flower's grid pulls replies by the ids of the messages it just sent, so a reply that
    arrives after its round closed is never handed to a later round; this check makes that
    a property of fedtune too (a replayed or misrouted reply is refused, not averaged in).
    :meth:`AdapterFedAvg.configure_train` stamps each instruction's ``group_id`` with the
    round (Flower's FedAvg leaves it empty) and replies inherit it.
    """
    group = msg.metadata.group_id
    if group == str(server_round):
        return None
    return (f"a reply to round {group or '(none)'} arrived in round {server_round} (late or "
            "replayed); ignored")


def reply_metric_record(content: RecordDict, allowed: set[str]) -> MetricRecord:
    """A reply's MetricRecord, once the reply holds nothing but ``allowed`` records (its
    entries are for the caller to validate)."""
    unexpected = sorted(set(content.keys()) - allowed)
    if unexpected:
        raise InvalidUpdate(f"unexpected records {unexpected}")
    if keys.METRICS not in content.metric_records:
        raise InvalidUpdate(f"no MetricRecord under `{keys.METRICS}`")
    return content.metric_records[keys.METRICS]


def reply_metrics(content: RecordDict, allowed: set[str]) -> MetricRecord:
    """A reply's validated metrics, once the reply holds nothing but ``allowed`` records."""
    metrics = reply_metric_record(content, allowed)
    validate_metrics(metrics)
    return metrics


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a record dict: arrays, byte strings, 8 per number, also per number
    of a list (no framing)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for cfg in content.config_records.values():
        for value in cfg.values():
            if isinstance(value, bytes | str):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in value)
            else:
                total += 8
    for metrics in content.metric_records.values():
        total += sum(8 * len(v) if isinstance(v, list) else 8 for v in metrics.values())
    return total


@dataclass(frozen=True)
class FederatedEval:
    """One round's evaluation on the devices' own held-out data: each device's mean loss
    and token count (allowed numbers, already on the wire), and the summaries users ask
    for — the plain mean over devices, the token-weighted mean, and the worst decile (the
    mean of the worst-scoring tenth of devices, at least one: how the weakest devices fare).
    """

    losses: tuple[float, ...]
    tokens: tuple[int, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))

    @property
    def weighted_mean(self) -> float:
        return float(np.average(self.losses, weights=self.tokens))

    @property
    def worst_decile(self) -> float:
        worst = sorted(self.losses, reverse=True)
        return float(np.mean(worst[: max(1, len(worst) // 10)]))

    def row(self) -> dict[str, object]:
        """The metrics-log fields (losses; perplexity is exp of each)."""
        return {"fed_eval_devices": len(self.losses), "fed_eval_loss_mean": self.mean,
                "fed_eval_loss_weighted": self.weighted_mean,
                "fed_eval_loss_worst_decile": self.worst_decile,
                "fed_eval_losses": list(self.losses)}


def last_reply_at(replies: Iterable[Message], default: float) -> float:
    """When the last of a round's replies arrived (``time.perf_counter``): a streamed
    exchange (:class:`server.polling_grid.ReplyStream`) records it; replies handed over as a
    list had all arrived by ``default``, the moment aggregation began."""
    finished = getattr(replies, "finished_at", None)
    return default if finished is None else float(finished)


def federated_eval(replies: Iterable[Message]) -> FederatedEval | None:
    """The valid evaluation replies' losses and token counts (error replies and replies
    without finite numbers are left out), or None if there is none."""
    losses, tokens = [], []
    for msg in replies:
        if msg.has_error() or keys.METRICS not in msg.content.metric_records:
            continue
        metrics = msg.content.metric_records[keys.METRICS]
        loss, count = metrics.get(keys.EVAL_LOSS), metrics.get(keys.EVAL_TOKENS)
        if (isinstance(loss, int | float) and np.isfinite(loss)
                and isinstance(count, int | float) and count > 0):
            losses.append(float(loss))
            tokens.append(int(count))
    return FederatedEval(tuple(losses), tuple(tokens)) if losses else None


S = TypeVar("S", bound=Strategy)


class StrategyWrapper(Strategy, Generic[S]):
    """A strategy around another that changes part of its behaviour (client-level DP, round
    retries): every call it does not override passes through to ``strategy`` unchanged."""

    def __init__(self, strategy: S) -> None:
        self.strategy = strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class AdapterFedAvg(FedAvg):
    """FedAvg over adapter deltas with fail-closed validation of each reply.

    Each reply is decoded once, into the delta it carries (every codec's output, whatever
    travelled), validated, optionally clipped, and averaged; the new global adapter is the
    round's plus the mean delta. The global adapter itself is decoded and encoded once per
    round: :meth:`global_tensors` hands the tensors of the record this strategy produced to
    evaluation, the checkpoint and the next round without parsing it again.
    """

    def __init__(
        self,
        spec: AdapterSpec,
        *,
        codec: str = "fp32",
        weighting: str = "examples",
        edge_combine: str = "average",
        max_abs_scalar: float = 1e3,
        max_update_norm: float = 0.0,
        clip_norm: float = 0.0,
        denominator: int = 0,
        max_upload_bytes: int = 0,
        max_run_upload_bytes: int = 0,
        server_learning_rate: float = 1.0,
        line_search: Sequence[float] = (),
        line_search_blocks: int = 8,
        line_search_momentum: Sequence[float] = (),
        edge_role: str = "train",
        judges: int = 0,
        stage_timeout_s: float = 600.0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        """``weighting="uniform"`` averages updates with equal weights: what client-level DP
        needs, since a client's weight would otherwise scale its sensitivity.
        ``max_update_norm > 0`` rejects a delta longer than that (L2): one oversized update
        would otherwise dominate a small cohort's mean. ``clip_norm > 0`` scales every
        accepted delta to at most that L2 norm (client-level DP's clipping: after
        validation, so a NaN or an oversized update is rejected, not clipped).
        ``denominator > 0`` divides the *sum* of the (uniformly weighted) deltas by that fixed
        number instead of by the count of accepted ones: client-level DP's expected cohort
        size (McMahan et al. 2018's fixed-denominator estimator). The count of accepted
        updates depends on the data (dropouts, rejections); dividing by it would let them
        scale what the noise, calibrated to the denominator, protects.
        ``max_upload_bytes > 0`` refuses a reply whose packed upload is larger (the
        communication budget, ``federation.max_upload_bytes``), before it is parsed;
        ``max_run_upload_bytes > 0`` refuses one that would take its device's accepted
        uploads over the run past that many bytes. ``edge_combine="add"`` folds replayed
        seed/scalar updates (forward-only devices) into a mean of their own, added to the
        mean of the other updates (``edge.combine``): the kind is what decoded the upload,
        not what the device claims, so only a replayed, bounded update is ever added;
        ``"exclude"`` leaves replayed updates out (a baseline: the other devices alone).
        ``server_learning_rate`` scales the aggregated step (``train.server_learning_rate``);
        ``line_search`` (``edge.line_search``) lists multiples of the aggregated step that
        the round's edge devices score on ``line_search_blocks`` of their own held-out
        blocks before the step is applied (:meth:`take_step`), each also with every
        multiple of the last applied step in ``line_search_momentum``; ``edge_role="judge"``
        (``edge.role``) trains torch devices only and ``judges`` (``edge.judges``) draws
        that many edge devices a round to score the line search without training
        (:mod:`server.kind_sampling`; :attr:`node_sampler` draws the round's order);
        ``stage_timeout_s`` bounds each such mid-round exchange (and secure aggregation's
        stages).

        The sampling options are Flower's ``FedAvg`` ones, passed through unchanged; its
        record keys are fedtune's wire keys.
        """
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes, weighted_by_key=keys.NUM_EXAMPLES,
            arrayrecord_key=keys.ARRAYS, configrecord_key=keys.CONFIG,
        )
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        if max_update_norm < 0:
            raise ValueError(f"max_update_norm must be >= 0, got {max_update_norm}")
        if clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        if edge_combine not in ("average", "add", "exclude"):
            raise ValueError(f"edge_combine must be 'average', 'add' or 'exclude', got "
                             f"{edge_combine!r}")
        if edge_combine != "average" and (denominator or clip_norm):
            raise ValueError(f"edge_combine={edge_combine!r} changes what one update can move; "
                             "it cannot run under client-level DP's clip and fixed denominator")
        if (line_search or server_learning_rate != 1) and (denominator or clip_norm):
            raise ValueError("line_search and server_learning_rate scale the aggregated step, "
                             "which client-level DP's noise is calibrated to; they cannot run "
                             "under its clip and fixed denominator")
        if not (np.isfinite(server_learning_rate) and server_learning_rate > 0):
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        self.server_learning_rate = server_learning_rate
        if denominator < 0 or (denominator and weighting != "uniform"):
            raise ValueError(f"denominator must be >= 0 and needs uniform weighting, got "
                             f"{denominator} with {weighting!r}")
        get_codec(codec)  # fail at start-up, not in round 1
        self.spec = spec
        self.codec_name = codec
        self.weighting = weighting
        self.edge_combine = edge_combine
        self.max_abs_scalar = max_abs_scalar
        self.max_update_norm = max_update_norm
        self.clip_norm = clip_norm
        self.denominator = denominator
        if max_upload_bytes < 0:
            raise ValueError(f"max_upload_bytes must be >= 0, got {max_upload_bytes}")
        self.max_upload_bytes = max_upload_bytes
        if max_run_upload_bytes < 0:
            raise ValueError(f"max_run_upload_bytes must be >= 0, got {max_run_upload_bytes}")
        self.max_run_upload_bytes = max_run_upload_bytes
        if any(not np.isfinite(x) for x in line_search) or line_search_blocks < 1:
            raise ValueError(f"line_search needs finite multiples and line_search_blocks >= 1, "
                             f"got {list(line_search)} and {line_search_blocks}")
        self.line_search = tuple(float(x) for x in line_search)
        self.line_search_blocks = line_search_blocks
        if line_search_momentum and not line_search:
            raise ValueError("line_search_momentum is searched with a line search, which is off")
        if any(not np.isfinite(x) for x in line_search_momentum):
            raise ValueError(f"line_search_momentum needs finite multiples, got "
                             f"{list(line_search_momentum)}")
        self.line_search_momentum = tuple(float(x) for x in line_search_momentum)
        #: the step the last round applied (edge.line_search_momentum); none after a resume
        self.applied_step: TensorsView | None = None
        if edge_role not in ("train", "judge"):
            raise ValueError(f"edge_role must be 'train' or 'judge', got {edge_role!r}")
        if judges < 0 or (judges and not line_search):
            raise ValueError(f"judges must be >= 0 and score a line search, got {judges} "
                             f"with line_search {list(line_search)}")
        if edge_role == "judge" and (denominator or clip_norm):
            raise ValueError("edge_role='judge' samples torch devices only, which client-level "
                             "DP's accounting (a uniform sample) does not allow")
        self.edge_role = edge_role
        self.judges = judges
        #: draws each round's order of devices for sampling by kind; the run sets it to the
        #: sampler Flower's uniform sample uses (server.node_sampling), reseeded each round
        self.node_sampler: random.Random = random.Random(0)
        self.node_kinds: dict[int, bool] = {}  # learnt: is the device an edge device
        self._round_judges: list[int] = []  # this round's judges outside its training sample
        self.stage_timeout_s = stage_timeout_s
        self._grid: Grid | None = None  # stored by configure_train for mid-round exchanges
        self._sent_global: ArrayRecord | None = None  # the round's adapter, packed as sent
        self._round_config = ConfigRecord()  # the round's train instruction
        self.node_upload_bytes: dict[int, int] = {}  # accepted bytes per device, this run
        self.stats: dict[int, RoundStats] = {}
        self.evaluations: dict[int, FederatedEval] = {}
        self._global: TensorsView = {}
        self.last_step: TensorsView = {}  # the global adapter's last change (_track_last_step)
        self._published: tuple[ArrayRecord, TensorsView] | None = None
        self._context = RoundContext(global_adapter={})
        self._codecs: tuple[str, ...] = (codec,)
        self.rank = adapter_rank(spec)
        self.node_ranks: dict[int, int] = {}  # learned from replies: each device's own rank
        self.torch_nodes: set[int] = set()  # learned from replies: who needs no last step
        self._rank_contexts: dict[int, tuple[RoundContext, AdapterSpec]] = {}

    # -- the global adapter, decoded once ------------------------------------------------
    def global_tensors(self, arrays: ArrayRecord) -> TensorsView:
        """The tensors of a global-adapter record: those of the record this strategy
        published last are returned as they are, any other record is parsed (once)."""
        if self._published is None or self._published[0] is not arrays:
            self._published = (arrays, from_record(arrays))
        return self._published[1]

    def publish(self, tensors: TensorsView) -> ArrayRecord:
        """The record Flower passes on for a new global adapter (remembering its tensors)."""
        record = to_record(tensors)
        self._published = (record, tensors)
        return record

    @property
    def current_global(self) -> TensorsView:
        """The global adapter sent out for the round in progress."""
        return self._global

    # -- train ---------------------------------------------------------------------------
    def begin_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord
                    ) -> ConfigRecord:
        """Take in the round's global adapter and instruction (what its replies are decoded
        against); return the instruction with the codec named."""
        previous, self._global = self._global, self.global_tensors(arrays)
        config = ConfigRecord(dict(config))  # Flower's FedAvg writes into it; keep ours clean
        config[keys.CODEC] = self.codec_name
        self._round_config = config
        edge = keys.EDGE_LEARNING_RATE in config
        subspace = get_str(config, keys.EDGE_SUBSPACE) if keys.EDGE_SUBSPACE in config else "full"
        if subspace == "trajectory":
            self._track_last_step(previous)
        self._context = RoundContext(
            global_adapter=self._global, server_round=server_round, spec=self.spec,
            learning_rate=get_float(config, keys.EDGE_LEARNING_RATE) if edge else 0.0,
            max_steps=get_int(config, keys.EDGE_LOCAL_STEPS) if edge else 0,
            max_abs_scalar=self.max_abs_scalar, subspace=subspace,
            last_step=self.last_step if subspace == "trajectory" else None)
        self._rank_contexts = {}
        self._codecs = (self.codec_name, *((get_str(config, keys.EDGE_CODEC),) if edge else ()))
        return config

    def _track_last_step(self, previous: TensorsView) -> None:
        """Remember the global adapter's last change (edge.subspace = 'trajectory').

        Taken between the adapters two rounds were *sent*, so it is the step that was
        actually made, after any wrapper (client-level DP's noise) and whatever combined
        the updates. A round that left the adapter unchanged (no valid update, a retry)
        keeps the step before it; a run's first round, or the first after a resume, has
        none yet (zeros: trajectory steps then move nothing). Only rounds in the
        'trajectory' subspace call this (one subtraction of the trainable tensors).
        """
        trainable = self.spec.trainable_keys
        if not previous:
            self.last_step = {k: np.zeros(self.spec.tensors[k].shape, np.float32)
                              for k in trainable}
            return
        step = {k: np.subtract(self._global[k], previous[k], dtype=np.float32)
                for k in trainable}
        if any(np.any(v) for v in step.values()):
            self.last_step = step

    def at_rank(self, rank: int) -> tuple[RoundContext, AdapterSpec]:
        """The round's context and spec as a device of ``rank`` sees them (its slice of
        the global adapter), built once per round and rank."""
        if rank == self.rank:
            return self._context, self.spec
        if rank not in self._rank_contexts:
            spec = spec_at_rank(self.spec, rank)
            self._rank_contexts[rank] = (
                replace(self._context, global_adapter=slice_rank(self._global, rank),
                        last_step=None if self._context.last_step is None
                        else slice_rank(self._context.last_step, rank), spec=spec), spec)
        return self._rank_contexts[rank]

    def send_own_ranks(self, messages: list[Message]) -> None:
        """Each device whose rank is known gets only its rank's slice of the adapter (the
        first round a device is sampled it gets the whole adapter and slices it itself)."""
        packed: dict[int, ArrayRecord] = {}
        for msg in messages:
            rank = self.node_ranks.get(msg.metadata.dst_node_id, self.rank)
            if rank < self.rank:
                if rank not in packed:
                    packed[rank] = pack_record(to_record(self.at_rank(rank)[0].global_adapter))
                # Flower's FedAvg gives every message one shared content: copy it first
                msg.content = RecordDict({**dict(msg.content.items()), keys.ARRAYS: packed[rank]})

    def send_last_step(self, messages: list[Message]) -> None:
        """The adapter's last step (edge.subspace = 'trajectory') to every device not known
        to train with torch: it is as large as the adapter and a torch device ignores it.
        A device's kind is what its last accepted reply said (a claim, which decides only
        what it is sent); one that never replied, or failed, gets the step."""
        assert self._context.last_step is not None
        step = pack_record(to_record(self._context.last_step))
        for msg in messages:
            if msg.metadata.dst_node_id not in self.torch_nodes:
                # Flower's FedAvg gives every message one shared content: copy it first
                msg.content = RecordDict({**dict(msg.content.items()), keys.LAST_STEP: step})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = self.begin_round(server_round, arrays, config)
        self._grid = grid
        stats = self.stats[server_round] = RoundStats(started=time.perf_counter())
        self._round_judges = []
        if self.edge_role == "judge":
            draw = self.draw_by_kind(server_round, grid, stats)
            messages = self.train_messages(server_round, arrays, config, draw.trainers)
        else:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            if self.judges:
                draw = self.draw_by_kind(server_round, grid, stats,
                                         chosen=[m.metadata.dst_node_id for m in messages])
        self._sent_global = _send_packed(messages, arrays)
        self.send_own_ranks(messages)
        if self._context.last_step is not None:  # edge.subspace = 'trajectory'
            self.send_last_step(messages)
        for msg in messages:  # Flower's FedAvg leaves it empty; replies inherit it
            msg.metadata.group_id = str(server_round)
        stats.sampled = len(messages)
        stats.bytes_down += sum(record_nbytes(record) for m in messages
                                for record in m.content.array_records.values())
        stats.sent = messages
        return messages

    # -- edge.role = 'judge', edge.judges: sampling by kind ------------------------------
    def draw_by_kind(self, server_round: int, grid: Grid, stats: RoundStats,
                     chosen: Sequence[int] = ()) -> KindSample:
        """The round's trainers and judges (:mod:`server.kind_sampling`): the connected
        devices in an order the run's sampler draws, asked their kind as needed. ``chosen``:
        the uniform sample already drawn (``edge.role = 'train'``), which trains as it is."""
        _, population = sample_nodes(grid, self.min_available_nodes, 0)  # waits like FedAvg
        order = self.node_sampler.sample(sorted(population), len(population))

        def ask(nodes: list[int]) -> dict[int, bool]:
            return self.ask_kinds(server_round, nodes, stats)

        draw = sample_by_kind(order, self.node_kinds, ask, trainers=self.min_train_nodes,
                              judges=self.judges, torch_trainers=self.edge_role == "judge",
                              chosen=chosen)
        self._round_judges = draw.judges
        stats.kinds_asked, stats.judges_drawn = draw.asked, len(draw.judges)
        if len(draw.trainers) < self.min_train_nodes:
            log.warning("round %d: %d of %d devices to train found among %d connected (the "
                        "rest are edge devices or did not answer)", server_round,
                        len(draw.trainers), self.min_train_nodes, len(population))
        log.info("round %d: sampled by kind: %d to train, %d edge judge(s); %d asked their "
                 "kind", server_round, len(draw.trainers), len(draw.judges), draw.asked)
        return draw

    def ask_kinds(self, server_round: int, nodes: list[int], stats: RoundStats
                  ) -> dict[int, bool]:
        """Ask ``nodes`` whether they are edge devices (``query.kind``); a device that
        fails, stays silent or answers anything but its kind is left out of the answer."""
        request = RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round})})
        answers = self._exchange(stats, dict.fromkeys(nodes, request), keys.KIND_MESSAGE,
                                 server_round, count_failures=False)
        kinds: dict[int, bool] = {}
        for node, content in answers.items():
            try:
                kinds[node] = validate_kind_reply(reply_metric_record(content, {keys.METRICS}))
            except InvalidUpdate as bad:
                log.warning("round %d: node %d's kind reply ignored: %s", server_round, node,
                            bad.reason)
        return kinds

    def train_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       nodes: Sequence[int]) -> list[Message]:
        """The round's train instructions to ``nodes``, as Flower's ``FedAvg`` builds them
        for its own sample (one shared content)."""
        config[keys.SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n)
                for n in nodes]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        _send_packed(messages, arrays)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Flower's weighted average, plus each device's result for the distribution."""
        replies = list(replies)
        result = federated_eval(replies)
        if result is not None:
            self.evaluations[server_round] = result
            log.info("round %d: federated evaluation on %d devices: loss mean %.4f, "
                     "token-weighted %.4f, worst decile %.4f", server_round,
                     len(result.losses), result.mean, result.weighted_mean,
                     result.worst_decile)
        return super().aggregate_evaluate(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.replies_at = time.perf_counter()  # replies handed over whole (a list) ...
        # Streaming: each reply is decoded, checked and folded into the running sum, then
        # dropped, so the coordinator holds one decoded update at a time, not a round's.
        # (Plain LoRA keeps each device's factors: mixed ranks average their products.)
        running = RunningSum()
        replayed = RunningSum()  # edge.combine = 'add': the forward-only devices' own mean
        factors: list[tuple[Tensors, int, int]] = []  # plain LoRA: (delta, rank, weight)
        accepted_metrics: list[MetricRecord] = []
        judges: list[int] = []  # edge.line_search: the accepted edge devices of the round
        answered: set[int] = set()  # node ids only: no reply's payload is kept
        for msg in replies:
            node = stats.node_of(msg)
            answered.add(node)
            if (stale := stale_reply(msg, server_round)) is not None:
                stats.reject(server_round, node, stale)
                continue
            if msg.has_error():
                stats.fail(server_round, node, msg.error.reason)
                self.node_ranks.pop(node, None)  # next time it gets the whole adapter
                self.torch_nodes.discard(node)  # ... and the last step
                continue
            try:
                delta, metrics, nbytes, rank, seed_steps = self._check_reply(msg)
                self.charge_upload(node, nbytes)
            except InvalidUpdate as bad:
                stats.reject(server_round, node, bad.reason)
                self.node_ranks.pop(node, None)
                self.torch_nodes.discard(node)
                continue
            self.node_ranks[node] = rank
            self.node_kinds[node] = claims_edge(metrics)
            if claims_edge(metrics):
                self.torch_nodes.discard(node)
                judges.append(node)
            else:
                self.torch_nodes.add(node)
            if seed_steps and self._context.last_step is not None and not (
                    self.clip_norm or self.denominator):  # under client DP: no per-device number
                stats.along_last_step.append(along(delta, self._context.last_step))
            if self.clip_norm:
                delta, norm = clip_update(delta, self.clip_norm)
                stats.clipped += norm > self.clip_norm
            weight = 1 if self.weighting == "uniform" else get_int(metrics, keys.NUM_EXAMPLES)
            apart = seed_steps and self.edge_combine != "average"  # edge.combine
            if self.trains_a and not apart:
                factors.append((delta, rank, weight))
            if apart:
                if self.edge_combine == "add":  # 'exclude': accepted, counted, left out
                    replayed.add(delta, weight)
            elif rank == self.rank or not self.trains_a:
                running.add(delta, weight)
            del delta
            accepted_metrics.append(metrics)
            stats.bytes_up += nbytes
            stats.count_upload(metrics, nbytes)
        stats.replies_at = last_reply_at(replies, stats.replies_at)  # ... or streamed
        stats.fail_unanswered(server_round, answered)
        stats.accepted = len(accepted_metrics)
        if not accepted_metrics:
            log.warning("round %d: no valid update; the global adapter is unchanged", server_round)
            stats.aggregated_at = time.perf_counter()
            return None, None
        if any(r < self.rank for _, r, _ in factors):
            # Plain LoRA with mixed ranks: the mean of each device's product B·A,
            # re-factorised at the global rank (FlexLoRA); its deltas stayed at their rank.
            # (The config refuses edge.combine = 'add' here: nothing else to add.)
            if replayed.weight:
                raise RuntimeError("edge steps cannot be added to re-factorised products")
            merged = aggregate_products(self._global, factors)
        else:
            merged = dict(self._global)
            for part in (running, replayed):
                if part.weight:
                    merged = apply_delta(merged, part.mean(self.denominator))
        merged = self.take_step(server_round, merged, judges, stats)
        stats.aggregated_at = time.perf_counter()
        return self.publish(merged), stats.summarise(accepted_metrics)

    # -- edge.line_search: the round's edge devices choose the step's length -----------
    def take_step(self, server_round: int, merged: Tensors, judges: Sequence[int],
                  stats: RoundStats) -> Tensors:
        """The new global adapter θ + η·s·u + μ·m: u = ``merged`` − θ is the aggregated
        step, s = :attr:`server_learning_rate`, m the step applied last round, and (η, μ)
        the pair of :attr:`line_search` × :attr:`line_search_momentum` with the lowest
        summed loss on the ``judges``' own held-out blocks (η = 1, μ = 0 without a line
        search, a judge's answer or a step). ``merged`` itself when s·η = 1 and μ = 0.

        Why the line search: the aggregated step has one length whatever the round's data
        say. An edge device cannot compute a gradient, but it scores a candidate adapter
        exactly, with forward passes, on text no torch device of the round saw. Scoring the
        step actually being made, before it is applied: offline, along a step whose central
        optimum was about 2, seven of eight devices alone chose 1.5 or 2 (one chose 1); along
        a harmful one (optimum 0.5), four of four chose 0.5 or 1 (BENCHMARKS.md, "Edge
        levers"). Why momentum: with two devices a round each step is noisy; adding part of
        the last step keeps the direction successive rounds agree on (server momentum, as in
        FedAvgM), here only where the judges' data say it helps. Each judge sends one loss
        per candidate; a lying judge can move the step only within the configured candidates.
        """
        moved = self._judged_step(server_round, merged, judges, stats)
        if self.line_search_momentum:
            self.applied_step = {k: np.subtract(moved[k], self._global[k], dtype=np.float32)
                                 for k in self.spec.trainable_keys}
        return moved

    def _judged_step(self, server_round: int, merged: Tensors, judges: Sequence[int],
                     stats: RoundStats) -> Tensors:
        lr = self.server_learning_rate
        judges = [*judges, *(n for n in self._round_judges if n not in judges)]
        if lr == 1 and not (self.line_search and judges):
            return merged
        trainable = self.spec.trainable_keys
        step = {k: np.subtract(merged[k], self._global[k], dtype=np.float32) for k in trainable}
        if lr != 1:
            step = {k: (np.float32(lr) * v).astype(np.float32) for k, v in step.items()}
        last = self.applied_step if self.line_search_momentum and self.applied_step and any(
            np.any(v) for v in self.applied_step.values()) else None
        eta, mu = self.search_line(server_round, step, judges, stats, last) if any(
            np.any(v) for v in step.values()) else (1.0, 0.0)
        if eta == 1 and lr == 1 and not mu:
            return merged
        moved = dict(merged)
        for k in trainable:
            value = self._global[k] + np.float32(eta) * step[k]
            if mu and last is not None:
                value = value + np.float32(mu) * last[k]
            moved[k] = value.astype(np.float32)
        return moved

    def search_line(self, server_round: int, step: TensorsView, judges: Sequence[int],
                    stats: RoundStats, last: TensorsView | None = None) -> tuple[float, float]:
        """The multiple η of ``step`` (and, with ``last``, the multiple μ of the last step,
        edge.line_search_momentum) the ``judges`` score lowest, or (1, 0)."""
        if not self.line_search or not judges:
            return 1.0, 0.0
        assert self._sent_global is not None, "configure_train packs the round's adapter"
        momenta = self.line_search_momentum if last is not None else (0.0,)
        config = ConfigRecord({
            keys.SERVER_ROUND: server_round,
            keys.LINE_SEARCH: list(self.line_search),
            keys.LINE_SEARCH_BLOCKS: self.line_search_blocks,
            keys.SEQ_LEN: get_int(self._round_config, keys.SEQ_LEN),
        })
        request = RecordDict({keys.ARRAYS: self._sent_global,
                              keys.STEP: pack_record(to_record(step)), keys.CONFIG: config})
        if last is not None:
            config[keys.LINE_SEARCH_MOMENTUM] = list(momenta)
            request[keys.LAST_STEP] = pack_record(to_record(last))
        candidates = [(eta, mu) for eta in self.line_search for mu in momenta]  # η major
        total = np.zeros(len(candidates), dtype=np.float64)
        count = 0
        answers = self._exchange(stats, dict.fromkeys(judges, request), keys.LINE_SEARCH_MESSAGE,
                                 server_round, count_failures=False)
        stats.judge_bytes_down += content_nbytes(request) * len(judges)
        stats.judge_bytes_up += sum(content_nbytes(c) for c in answers.values())
        for node, content in answers.items():
            try:
                losses = validate_line_search(reply_metric_record(content, {keys.METRICS}),
                                              len(candidates))
            except InvalidUpdate as bad:
                log.warning("round %d: node %d's line-search reply ignored: %s", server_round,
                            node, bad.reason)
                continue
            total += losses
            count += 1
        if not count:
            log.warning("round %d: no edge device scored the line search; the aggregated "
                        "step is applied as it is", server_round)
            return 1.0, 0.0
        # The lowest summed loss; a tie goes to the candidate nearest the step as aggregated.
        best = min(range(len(candidates)), key=lambda i: (
            total[i], abs(candidates[i][0] - 1.0) + abs(candidates[i][1])))
        eta, mu = candidates[best]
        stats.line_search_multiple, stats.line_search_judges = eta, count
        if last is not None:
            stats.line_search_momentum = mu
        log.info("round %d: line search by %d edge device(s): %.2f x the aggregated step%s",
                 server_round, count, eta,
                 f" + {mu:.2f} x the last step" if last is not None else "")
        return eta, mu

    def _exchange(
        self, stats: RoundStats, requests: Mapping[int, RecordDict], message_type: str,
        server_round: int, *, count_failures: bool = True,
    ) -> dict[int, RecordDict]:
        """Send one stage's requests and collect the answers. A node that answers with an
        error or not at all is a failed client — except in the unmask stage
        (``count_failures=False``), whose nodes already count as clients of the round: a
        missing share there is only logged (the threshold decides whether the sum is
        recovered) and the line search, whose judges already answered their train
        instruction."""
        assert self._grid is not None, "configure_train stores the grid first"
        messages = [Message(content=c, dst_node_id=n, message_type=message_type,
                            group_id=str(server_round)) for n, c in requests.items()]
        stats.bytes_down += sum(content_nbytes(c) for c in requests.values())
        out: dict[int, RecordDict] = {}
        replies = list(self._grid.send_and_receive(messages, timeout=self.stage_timeout_s))
        stage = message_type.rsplit(".", 1)[-1]
        if count_failures:
            stats.fail_silent(server_round, replies, messages, stage=stage)
        for reply in replies:
            node = stats.node_of(reply, messages)
            if reply.has_error():
                if count_failures:
                    stats.fail(server_round, node, f"{stage}: {reply.error.reason}")
                else:
                    log.warning("round %d: node %d failed in %s: %s", server_round, node,
                                stage, reply.error.reason)
                continue
            if node in requests:
                stats.bytes_up += content_nbytes(reply.content)
                out[node] = reply.content
        return out


    def _check_reply(self, msg: Message) -> tuple[Tensors, MetricRecord, int, int, bool]:
        """A reply's delta (decoded once, by the codec that recognises it), its metrics, its
        size, the device's rank and whether it was replayed from seeds and scalars;
        :class:`InvalidUpdate` names the defect. A lower rank's FFA-LoRA delta comes back
        zero-padded to the global rank (exact: A is shared)."""
        content = msg.content
        metrics = reply_metrics(content, {keys.ARRAYS, keys.METRICS})
        if keys.ARRAYS not in content.array_records:
            raise InvalidUpdate(f"no ArrayRecord under `{keys.ARRAYS}`")
        record = content.array_records[keys.ARRAYS]
        size = record_nbytes(record)
        if self.max_upload_bytes and size > self.max_upload_bytes:
            raise InvalidUpdate(f"upload of {size} bytes is over the budget of "
                                f"{self.max_upload_bytes} (federation.max_upload_bytes)")
        rank = self.reply_rank(metrics)
        context, spec = self.at_rank(rank)
        seed_steps = False
        try:
            views = unpack_views(record) if "fp32" in self._codecs and is_packed(record) else {}
            if views and is_fp32_upload(views):
                delta = views  # fp32 read in place: no copy of the message's bytes
            else:
                upload = unpack_record(record)
                seed_steps = (SEED_CODEC_NAME in self._codecs
                              and get_codec(SEED_CODEC_NAME).recognises(upload))
                delta = decode_upload(upload, context, self._codecs)
        except ValueError as bad:  # e.g. a seed replay against a rank the device only claims
            if isinstance(bad, InvalidUpdate):
                raise
            raise InvalidUpdate(f"the upload does not decode at rank {rank}: {bad}") from None
        validate_update(delta, spec)
        self.check_norm(delta)
        if rank < self.rank and not self.trains_a:
            delta = pad_rank(delta, {k: self.spec.tensors[k].shape for k in delta})
        return delta, metrics, size, rank, seed_steps

    def charge_upload(self, node: int, nbytes: int, *, commit: bool = True) -> None:
        """Count an accepted upload against its device's run budget; refuse one over it.
        ``commit=False`` only checks (secure aggregation commits once the sum is known)."""
        total = self.node_upload_bytes.get(node, 0) + nbytes
        if self.max_run_upload_bytes and total > self.max_run_upload_bytes:
            raise InvalidUpdate(
                f"upload of {nbytes} bytes would take this device to {total} bytes this run, "
                f"over the budget of {self.max_run_upload_bytes} "
                "(federation.max_run_upload_bytes)")
        if commit:
            self.node_upload_bytes[node] = total

    def reply_rank(self, metrics: MetricRecord) -> int:
        """The rank a reply says its device trained (the global rank if it says none)."""
        if not self.rank:  # an adapter without LoRA factors has no ranks to choose
            return 0
        value = metrics.get(keys.LORA_RANK, self.rank)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.rank:
            raise InvalidUpdate(f"`{keys.LORA_RANK}` = {value!r}: a device's rank must be an "
                                f"integer in [1, {self.rank}] (the global adapter's rank)")
        if value < self.rank and self.trains_a and (
                self.clip_norm or self.denominator or self.max_update_norm):
            # Plain LoRA's mixed ranks average products and re-factorise A and B: nothing
            # there is bounded by a clip or a norm check, so one claim would undo them.
            raise InvalidUpdate(f"`{keys.LORA_RANK}` = {value}: plain LoRA takes lower ranks "
                                "only without client-level DP or security.max_update_norm")
        return value

    @property
    def trains_a(self) -> bool:
        """Whether A is trained (plain LoRA) rather than frozen and shared (FFA-LoRA)."""
        return any(t.trainable for k, t in self.spec.tensors.items() if is_a(k))

    def check_norm(self, delta: TensorsView) -> None:
        """Raise if the delta's L2 norm exceeds :attr:`max_update_norm`; without a bound
        (the default) nothing is computed."""
        if not self.max_update_norm:
            return
        norm = update_norm(delta)
        if norm > self.max_update_norm:
            raise InvalidUpdate(f"update norm {norm:.4g} exceeds the coordinator's bound "
                                f"{self.max_update_norm:.4g} (security.max_update_norm)")


class RunningSum:
    """``Σ w·delta`` per tensor, folded in one update at a time (and the total weight): the
    streaming form of FedAvg's example-weighted mean (McMahan et al. 2017, Alg. 1; of the
    deltas here, which is the same as averaging the clients' adapters).

    Updates are added into float32 partial sums, which are folded into the float64 totals
    every :attr:`BLOCK` updates: a float32 add reads and writes half the bytes of a
    float64 one (the aggregation is memory-bound), and a partial sum of at most 16 terms
    keeps float32's rounding (relative ``16 · 2**-24``) far below anything that matters
    for a mean of updates."""

    BLOCK = 16

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.partial: dict[str, np.ndarray] = {}
        self.pending = 0
        self.weight = 0.0

    def add(self, delta: TensorsView, weight: float) -> None:
        for key, value in delta.items():
            acc = self.partial.get(key)
            if acc is None:
                self.partial[key] = np.multiply(value, np.float32(weight), dtype=np.float32)
            elif weight == 1:
                np.add(acc, value, out=acc)
            else:
                acc += np.multiply(value, np.float32(weight), dtype=np.float32)
        self.weight += weight
        self.pending += 1
        if self.pending == self.BLOCK:
            self._fold()

    def _fold(self) -> None:
        for key, acc in self.partial.items():
            if key in self.sums:
                self.sums[key] += acc
            else:
                self.sums[key] = acc.astype(np.float64)
        self.partial, self.pending = {}, 0

    def mean(self, denominator: float = 0) -> Tensors:
        """The sum over ``denominator`` (client-level DP's fixed one), else the weighted
        mean; float32, rounded once."""
        self._fold()
        scale = 1.0 / (denominator or self.weight)
        return {k: (v * scale).astype(np.float32) for k, v in self.sums.items()}
