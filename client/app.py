"""The fedtune ClientApp: what runs on a device for each instruction from the coordinator.

Flower calls ``train`` / ``evaluate`` with a Message holding the global adapter and a
ConfigRecord. The reply holds only the (encoded) adapter update and a closed set of numeric
metrics; local text and token ids never enter a record.

``app`` is the ClientApp every app bundle names (``client.app:app``): it reads its settings
from the Flower run config, with the device's own settings and policy applied over it
(:mod:`client.node_policy`). ``make_client_app`` bakes in a run config for the Simulation
Engine, which cannot pass one to ``run_simulation``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.error_feedback import encode_with_feedback, load_residual, store_residual
from client.local_data import (
    DeviceDataSource,
    LocalData,
    LocalDataError,
    load_device_data,
    simulated_device_folder,
)
from client.node_policy import (
    device_data_source,
    is_deployed,
    is_edge_client,
    node_settings_mod,
    partition_id,
)
from client.secagg_client import (
    SecAggIdentity,
    handle_consistency,
    handle_setup,
    handle_share_keys,
    handle_unmask,
    mask_update,
)
from client.trainer import Trainer, TrainInstruction
from protocols import keys
from protocols.adapter_rank import pad_rank, shape_at_rank, slice_rank
from protocols.codecs import ClientUpdate, RoundContext, from_record, get_codec, record_nbytes
from protocols.packing import pack_record, unpack_record
from protocols.records import get_float, get_int, get_str
from protocols.run_config import PathsSection, RunConfig
from protocols.secagg import wire as secagg_wire

if TYPE_CHECKING:
    from client.edge_trainer import EdgeMeZOTrainer

log = logging.getLogger(__name__)

_TRAINERS: dict[tuple[Any, ...], Trainer] = {}


def _settings(context: Context, baked: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(context.run_config)
    merged.update(baked)
    return merged


def _trainer(flat: Mapping[str, Any], *, edge: bool = False, rank: int = 0) -> Trainer:
    """One trainer (one loaded base model) per process, reused across rounds; a torch
    device of ``rank`` below ``lora.r`` trains that many components."""
    if edge:
        return _edge_trainer(flat)
    from client.dp_sgd import DpSgdSettings
    from client.torch_trainer import TorchLoraTrainer  # torch only when training on torch
    from kernels.base_model import resolve_model_dir

    config = RunConfig.from_flat(flat)
    paths = PathsSection.from_flat(flat)
    model_dir = resolve_model_dir(config.model.source, paths.required("cache_dir"))
    dpsgd = DpSgdSettings.from_privacy(config.privacy) if config.privacy.dpsgd else None
    lora = config.lora.at_rank(rank or config.lora.r)
    key = (str(model_dir), config.model, lora, config.federation.client_threads, dpsgd,
           config.data.template, config.client)
    if key not in _TRAINERS:
        if config.security.verify_manifest:
            verify_base_model(model_dir, paths.manifest_public_key, paths.signed_manifest)
        # A process serving devices of several ranks rebuilds its trainer per rank: the
        # devices' DP-SGD histories (per client id) must outlive it.
        ledger = next((getattr(t, "dpsgd_ledger", None) for k, t in _TRAINERS.items()
                       if k[:1] == key[:1] and k[4] == dpsgd), None)
        _TRAINERS.clear()  # one base model in memory at a time
        trainer = TorchLoraTrainer(
            model_dir, lora, threads=config.federation.client_threads, dpsgd=dpsgd,
            model_section=config.model, template=config.data.template, client=config.client,
        )
        if ledger is not None:
            trainer.dpsgd_ledger = ledger
        _TRAINERS[key] = trainer
    return _TRAINERS[key]


def _edge_trainer(flat: Mapping[str, Any]) -> EdgeMeZOTrainer:
    """The forward-only trainer on the coordinator's signed ONNX export: no torch here."""
    from client.edge_trainer import EdgeMeZOTrainer, MeZOSettings

    config = RunConfig.from_flat(flat)
    paths = PathsSection.from_flat(flat)
    export_dir = paths.required("edge_export")
    settings = MeZOSettings(epsilon=config.edge.epsilon,
                            max_abs_scalar=config.edge.max_abs_scalar,
                            check_blocks=config.edge.check_blocks)
    key = ("edge", str(export_dir), config.lora, config.federation.client_threads, settings,
           config.data.template)
    if key not in _TRAINERS:
        public_key = (pinned_public_key(paths.manifest_public_key)
                      if config.security.verify_manifest else None)
        _TRAINERS.clear()
        _TRAINERS[key] = EdgeMeZOTrainer.from_export(
            export_dir, config.lora, threads=config.federation.client_threads,
            public_key=public_key, settings=settings, template=config.data.template,
        )
    trainer = _TRAINERS[key]
    assert isinstance(trainer, EdgeMeZOTrainer)
    return trainer


def pinned_public_key(public_key_hex: str) -> Any:
    """The coordinator key this device trusts for signed base models (torch or ONNX)."""
    from protocols.manifest import ManifestError, load_public_key

    if not public_key_hex:
        raise ManifestError(
            "security.verify_manifest is on but no coordinator public key was provided "
            "(paths.manifest_public_key); pin the coordinator's key or turn verification off"
        )
    return load_public_key(bytes.fromhex(public_key_hex))


def verify_base_model(model_dir: Path, public_key_hex: str, signed_manifest: str) -> None:
    """Refuse to train on a base the coordinator did not sign (ReCIT: a tampered base can
    make honest PEFT gradients leak training text). Runs before the model is loaded.

    ``signed_manifest`` arrives with the run (``paths.signed_manifest``, which only the
    coordinator's run config sets); the device's own model folder is checked against it
    with the key the device pinned. Nothing is written into the model folder, and no
    manifest file needs to be in it."""
    from protocols.manifest import ManifestError, SignedManifest, verify_directory

    public_key = pinned_public_key(public_key_hex)
    if not signed_manifest:
        raise ManifestError(
            "security.verify_manifest is on but the run brought no signed manifest of the "
            "base model (paths.signed_manifest); the coordinator adds it when it starts the "
            "run (`fedtune simulate` or `fedtune coordinator`, the same fedtune version as "
            "this device), or turn verification off"
        )
    verify_directory(model_dir, public_key, signed=SignedManifest.from_text(signed_manifest))


def _local_data(flat: Mapping[str, Any], context: Context) -> LocalData:
    """This device's own data: what its own config names (a deployed device), else the
    folder the simulation wrote for this partition. Read in this process only."""
    source = device_data_source(context.node_config)
    pid = partition_id(context)
    if source is None:
        # Only a simulated node (no device settings at all) reads the folder a simulation
        # wrote for it; a device never reads data the coordinator's run config names.
        devices_dir = (None if is_deployed(context.node_config)
                       else PathsSection.from_flat(flat).devices_dir)
        if devices_dir is None:
            raise LocalDataError("this device's config names no data: set [data] path in its "
                                 "`fedtune client` config (a file or folder of its own data)")
        source = DeviceDataSource(simulated_device_folder(devices_dir, pid))
    return load_device_data(source, client_id=f"device-{pid}")


def _instruction(msg: Message, *, edge: bool = False) -> TrainInstruction:
    cfg = msg.content.config_records[keys.CONFIG]
    subspace = (get_str(cfg, keys.EDGE_SUBSPACE) if edge and keys.EDGE_SUBSPACE in cfg
                else "full")
    last_step = None
    if subspace == "trajectory":
        if keys.LAST_STEP not in msg.content.array_records:
            raise ValueError(f"the train message has edge-subspace = 'trajectory' but no "
                             f"`{keys.LAST_STEP}` record (the coordinator's last step of the "
                             "global adapter, the direction this device searches along)")
        last_step = from_record(unpack_record(msg.content.array_records[keys.LAST_STEP]))
    return TrainInstruction(
        server_round=get_int(cfg, keys.SERVER_ROUND),
        local_steps=get_int(cfg, keys.EDGE_LOCAL_STEPS if edge else keys.LOCAL_STEPS),
        batch_size=get_int(cfg, keys.BATCH_SIZE),
        learning_rate=get_float(cfg, keys.EDGE_LEARNING_RATE if edge else keys.LEARNING_RATE),
        seq_len=get_int(cfg, keys.SEQ_LEN),
        seed=get_int(cfg, keys.SEED),
        subspace=subspace,
        last_step=last_step,
    )


def device_rank(flat: Mapping[str, Any], context: Context, *, edge: bool) -> int:
    """The LoRA rank this device trains: ``lora.r`` for edge devices (their export has
    that rank), else its own setting or the simulation's ``lora.device_ranks``."""
    lora = RunConfig.from_flat(flat).lora
    return lora.r if edge else lora.rank_of(partition_id(context))


def check_received_rank(adapter: Mapping[str, Any], rank: int) -> None:
    """Refuse an adapter with fewer components than this device trains (a coordinator that
    remembers an older, lower rank of this device): the round fails with the reason, and
    the coordinator sends the whole adapter next time."""
    received = min((v.shape[0] for k, v in adapter.items() if ".lora_A." in k), default=rank)
    if received < rank:
        raise ValueError(f"received a rank-{received} adapter, but this device trains rank "
                         f"{rank} (lora.device_rank / [resources] lora_rank)")


def handle_train(msg: Message, context: Context, flat: Mapping[str, Any]) -> Message:
    edge = is_edge_client(flat, context)
    rank = device_rank(flat, context, edge=edge)
    full = from_record(unpack_record(msg.content.array_records[keys.ARRAYS]))
    check_received_rank(full, rank)
    # A device of a lower rank trains the global adapter's first `rank` components.
    adapter = slice_rank(full, rank)
    instruction = _instruction(msg, edge=edge)
    cfg = msg.content.config_records[keys.CONFIG]
    trainer = _trainer(flat, edge=edge, rank=rank)
    data = _local_data(flat, context)
    # Distinct batches per client within a round, reproducible across reruns.
    seeded = dataclasses.replace(
        instruction, seed=instruction.seed * 1_000_003 + partition_id(context))
    outcome = trainer.train(adapter, data, seeded)
    # Every upload is the delta from the global adapter this round started from.
    update = ClientUpdate(delta={k: outcome.tensors[k] - adapter[k] for k in outcome.tensors},
                          seed_update=getattr(outcome, "seed_update", None))
    if secagg_wire.RECORD in msg.content.config_records:
        # Secure aggregation: the flat delta, clipped/noised/masked on the device. (An edge
        # client's seed/scalar pairs cannot be summed under masks: it sends the dense delta.)
        # Every masked vector has the global rank's length: a lower rank pads with zeros,
        # which is FFA-LoRA's exact aggregation of mixed ranks.
        global_rank = RunConfig.from_flat(flat).lora.r
        padded = pad_rank(update.delta, {k: shape_at_rank(k, v.shape, global_rank)
                                         for k, v in update.delta.items()})
        flat_delta = np.concatenate([padded[k].ravel() for k in sorted(padded)])
        upload_key = secagg_wire.MASKED
        masking = secagg_wire.MaskingInstruction.from_record(msg.content)
        levels = masking.levels
        # Under distributed DP no feedback: the loss would be mostly noise, or (Skellam
        # noise after rounding) this device's un-noised rounding, carried into the next one.
        feedback = (levels > 0 and not masking.dp_clip_norm
                    and RunConfig.from_flat(flat).federation.error_feedback)
        tag = f"secagg-levels-{levels}"
        if feedback:  # a quantized round: what the last one lost joins this update
            residual = load_residual(context, tag, {"flat": flat_delta})
            flat_delta = flat_delta + residual.get("flat", 0.0)
        masked = mask_update(flat_delta, msg.content, context)
        if feedback and masked.lost is not None:
            store_residual(context, tag, {"flat": masked.lost.astype(np.float32)})
        upload = secagg_wire.masked_record(masked.vector, masked.modulus_bits)
    else:
        upload_key = keys.ARRAYS
        ctx = RoundContext(global_adapter=adapter, server_round=instruction.server_round,
                           seed=seeded.seed)
        codec = get_codec(get_str(cfg, keys.EDGE_CODEC if edge else keys.CODEC))
        if codec.lossy and RunConfig.from_flat(flat).federation.error_feedback:
            # What this upload loses stays on the device and joins the next one.
            record = encode_with_feedback(codec, update, ctx, context)
        else:
            record = codec.encode(update, ctx)
        upload = pack_record(record)
    metrics = MetricRecord({keys.NUM_EXAMPLES: 1, keys.UPLOAD_BYTES: record_nbytes(upload)})
    if rank < RunConfig.from_flat(flat).lora.r:
        # A lower rank says so: the coordinator decodes its upload against its slice (the
        # shapes tell the rank anyway; a fixed configuration, not the device's data).
        metrics[keys.LORA_RANK] = rank
    if not cfg.get(keys.CLIENT_DP):
        # Under client-level DP, which covers the update only, the device reports one update
        # and its size: its loss, example count and timing would leave in the clear.
        metrics[keys.NUM_EXAMPLES] = outcome.num_examples
        for key, value in outcome.metrics.items():
            metrics[key] = float(value)
    if edge:
        metrics[keys.EDGE_CLIENT] = 1.0
    return Message(RecordDict({upload_key: upload, keys.METRICS: metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, flat: Mapping[str, Any]) -> Message:
    edge = is_edge_client(flat, context)
    rank = device_rank(flat, context, edge=edge)
    received = from_record(unpack_record(msg.content.array_records[keys.ARRAYS]))
    check_received_rank(received, rank)
    adapter = slice_rank(received, rank)
    cfg = msg.content.config_records[keys.CONFIG]
    data = _local_data(flat, context)
    outcome = _trainer(flat, edge=edge, rank=rank).evaluate(
        adapter, data, seq_len=get_int(cfg, keys.SEQ_LEN), batch_size=get_int(cfg, keys.BATCH_SIZE)
    )
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: outcome.tokens,
            keys.EVAL_LOSS: outcome.loss,
            keys.EVAL_TOKENS: outcome.tokens,
        }
    )
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def _numbers(cfg: Mapping[str, Any], key: str) -> list[float]:
    """A non-empty list of numbers from a config record (the line search's multiples)."""
    values = cfg.get(key)
    if not isinstance(values, list) or not values or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in values):
        raise ValueError(f"`{key}` must be a list of numbers, got {values!r}")
    return [float(x) for x in values]


def handle_line_search(msg: Message, context: Context, flat: Mapping[str, Any]) -> Message:
    """Score the coordinator's line search (``edge.line_search``): this device's own loss at
    the round's adapter plus each multiple of the aggregated step. Only edge devices are
    asked; the reply is one loss per multiple and nothing else."""
    if not is_edge_client(flat, context):
        raise ValueError("the coordinator asked a torch device to score a line search; only "
                         "edge devices are asked (a device that trains with torch must not "
                         "report `edge-client`)")
    cfg = msg.content.config_records[keys.CONFIG]
    for key in (keys.ARRAYS, keys.STEP):
        if key not in msg.content.array_records:
            raise ValueError(f"the line-search query has no `{key}` record (the round's "
                             "adapter and the aggregated step it scores)")
    adapter = from_record(unpack_record(msg.content.array_records[keys.ARRAYS]))
    step = from_record(unpack_record(msg.content.array_records[keys.STEP]))
    multiples = _numbers(cfg, keys.LINE_SEARCH)
    last_step, momenta = None, [0.0]
    if keys.LINE_SEARCH_MOMENTUM in cfg:  # edge.line_search_momentum: with the last step
        if keys.LAST_STEP not in msg.content.array_records:
            raise ValueError(f"the line-search query has `{keys.LINE_SEARCH_MOMENTUM}` but no "
                             f"`{keys.LAST_STEP}` record to scale")
        momenta = _numbers(cfg, keys.LINE_SEARCH_MOMENTUM)
        last_step = from_record(unpack_record(msg.content.array_records[keys.LAST_STEP]))
    trainer = _edge_trainer(flat)
    losses = trainer.score_multiples(
        adapter, step, multiples, _local_data(flat, context),
        seq_len=get_int(cfg, keys.SEQ_LEN), blocks=get_int(cfg, keys.LINE_SEARCH_BLOCKS),
        last_step=last_step, momenta=momenta)
    return Message(RecordDict({keys.METRICS: MetricRecord({keys.LINE_SEARCH_LOSSES: losses})}),
                   reply_to=msg)


def handle_kind(msg: Message, context: Context, flat: Mapping[str, Any]) -> Message:
    """Tell the coordinator this device's kind (edge.role = 'judge', edge.judges: it samples
    torch devices to train and edge devices to judge): 1 for an edge (forward-only) device,
    0 for a torch one, and nothing else. Train replies carry the same claim."""
    return Message(RecordDict({keys.METRICS: MetricRecord(
        {keys.EDGE_CLIENT: 1.0 if is_edge_client(flat, context) else 0.0})}), reply_to=msg)


def make_client_app(
    run_config: Mapping[str, Any] | None = None, *, mods: list[Mod] | None = None,
    late_settings: Callable[[Context], Mapping[str, Any]] | None = None,
) -> ClientApp:
    """A ClientApp whose settings are ``run_config`` over Flower's own run config.

    ``mods`` wrap every handler (Flower's mechanism for DP clipping, size checks, capture).
    ``late_settings`` adds settings known only once a message arrives (under ``flwr run``,
    the paths the simulation's ServerApp prepared); Flower's run config itself is read-only.
    """
    baked = dict(run_config or {})
    app = ClientApp(mods=mods)

    def settings(context: Context) -> dict[str, Any]:
        merged = _settings(context, baked)
        if late_settings is not None:
            merged.update(late_settings(context))
        return merged

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, settings(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, settings(context))

    @app.query(keys.LINE_SEARCH_MESSAGE.split(".")[1])
    def line_search(msg: Message, context: Context) -> Message:
        return handle_line_search(msg, context, settings(context))

    @app.query(keys.KIND_MESSAGE.split(".")[1])
    def kind(msg: Message, context: Context) -> Message:
        return handle_kind(msg, context, settings(context))

    register_secagg_stages(app, settings)
    return app


def simulated_identity_key(devices_dir: Path, pid: int) -> Path:
    """Where a simulation keeps simulated device ``pid``'s identity key: beside its data
    folder, which holds nothing but data."""
    return Path(devices_dir) / "identity" / f"{pid:05d}.key"


def secagg_identity(flat: Mapping[str, Any], context: Context) -> SecAggIdentity:
    """The organisation key this device pins and its own identity key, for authenticated
    secure aggregation. A deployed device's come from its own config only (the node policy
    drops the coordinator's); a simulated device's key is the simulation's file for it."""
    from protocols.manifest import load_private_key

    paths = PathsSection.from_flat(flat)
    key_path = paths.identity_key
    if key_path is None and not is_deployed(context.node_config) and paths.devices_dir:
        candidate = simulated_identity_key(paths.devices_dir, partition_id(context))
        key_path = candidate if candidate.is_file() else None
    org = bytes.fromhex(paths.roster_public_key) if paths.roster_public_key else b""
    return SecAggIdentity(org, load_private_key(key_path) if key_path is not None else None)


def register_secagg_stages(
    app: ClientApp, settings: Callable[[Context], Mapping[str, Any]]
) -> None:
    """The secure-aggregation query handlers (the masked upload itself rides on `train`)."""

    @app.query(secagg_wire.SETUP.split(".")[1])
    def secagg_setup(msg: Message, context: Context) -> Message:
        identity = secagg_identity(settings(context), context)
        return Message(handle_setup(msg.content, context, identity), reply_to=msg)

    @app.query(secagg_wire.SHARE_KEYS.split(".")[1])
    def secagg_share_keys(msg: Message, context: Context) -> Message:
        return Message(handle_share_keys(msg.content, context), reply_to=msg)

    @app.query(secagg_wire.CONSISTENCY.split(".")[1])
    def secagg_consistency(msg: Message, context: Context) -> Message:
        identity = secagg_identity(settings(context), context)
        return Message(handle_consistency(msg.content, context, identity), reply_to=msg)

    @app.query(secagg_wire.UNMASK.split(".")[1])
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return Message(handle_unmask(msg.content, context), reply_to=msg)


app = make_client_app(mods=[node_settings_mod])
