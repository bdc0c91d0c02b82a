"""The device's policy: its own settings over the coordinator's run config, and the
protections it refuses to do without. ``client.app:app`` (what every app bundle names) runs
every handler behind :func:`node_settings_mod`; in a simulation the node config carries no
``fedtune-*`` key and the mod changes nothing.

In a simulation the coordinator's run config names the clients' files; on a real device
only the device knows where its data and base model are, and the device, not the
coordinator, must decide which coordinator key it trusts (a coordinator that could swap the
pinned manifest key could serve a tampered base, ReCIT). The mod also refuses, before any
training, a run that asks for less protection than the device requires.

Node config keys (set by ``fedtune client`` from its TOML; all optional):

=================================  ==========================================================
``partition-id``                   this device's index: seeds its batches (a simulation: its
                                   data folder and whether it is an edge device)
``fedtune-data-path``              the device's own data, a file or folder (read here only)
``fedtune-data-format``            its layout: auto, text, instruction or chat
``fedtune-data-heldout-fraction``  share kept back for evaluation (without its own split)
``fedtune-data-seed``              fixes which examples are held out
``fedtune-cache-dir``              the device's model cache → ``paths.cache_dir``
``fedtune-edge-export``            the device's ONNX export → ``paths.edge_export``
``fedtune-manifest-public-key``    pinned coordinator key (hex) → ``paths.manifest_public_key``
``fedtune-roster-public-key``      pinned organisation key (hex) → ``paths.roster_public_key``
``fedtune-identity-key``           this device's identity key file → ``paths.identity_key``
``fedtune-client-threads``         torch/ORT threads → ``federation.client_threads``
``fedtune-client-device``          where torch trains (auto/cpu/cuda:N) → ``client.device``
``fedtune-lora-rank``              the LoRA rank this device trains → ``lora.device_rank``
``fedtune-client-kind``            ``gpu`` or ``edge``: refuse a run that assigns the other
``fedtune-require-manifest``       refuse runs with ``security.verify_manifest = false``
``fedtune-require-secagg``         refuse runs with ``security.secagg = false``
=================================  ==========================================================

The base model's signed manifest (``paths.signed_manifest``) and the organisation's signed
roster (``paths.secagg_roster``) are run keys a device never replaces: the coordinator
relays them, the device pins the keys that check them (:data:`COORDINATOR_ONLY`). Those
pinned keys, and the device's identity key, come from the device's own config only
(:data:`DEVICE_ONLY`): a coordinator that could name them would choose what the device
trusts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.local_data import DeviceDataSource, LocalDataError
from kernels.data.formats import DATA_FORMATS, DataFormatError
from kernels.data.templates import TemplateError
from protocols.entry_point import log_to_stderr
from protocols.run_config import RunConfig

log = logging.getLogger(__name__)

#: node config key -> the run config key it replaces on this device.
NODE_OVERRIDES = {
    "fedtune-cache-dir": "paths.cache_dir",
    "fedtune-edge-export": "paths.edge_export",
    "fedtune-manifest-public-key": "paths.manifest_public_key",
    "fedtune-roster-public-key": "paths.roster_public_key",
    "fedtune-identity-key": "paths.identity_key",
    "fedtune-client-threads": "federation.client_threads",
    "fedtune-client-device": "client.device",
    "fedtune-lora-rank": "lora.device_rank",
}
#: run config keys only the coordinator's run config provides; no node setting replaces them.
COORDINATOR_ONLY = frozenset({"paths.signed_manifest", "paths.secagg_roster"})
#: run config keys a deployed device takes from its own config or not at all.
DEVICE_ONLY = frozenset({"paths.manifest_public_key", "paths.roster_public_key",
                         "paths.identity_key"})
if COORDINATOR_ONLY & set(NODE_OVERRIDES.values()):  # a guard for whoever edits the table
    raise RuntimeError(f"NODE_OVERRIDES must not replace {sorted(COORDINATOR_ONLY)}")
ClientKind = Literal["gpu", "edge"]
CLIENT_KINDS: tuple[ClientKind, ...] = get_args(ClientKind)


def partition_id(context: Context) -> int:
    """This node's data partition: its identity for data, client kind and batch seeds
    (Flower's node id is random in each simulation run, the partition id is not)."""
    return int(context.node_config["partition-id"])


def device_data_source(node_config: Mapping[str, Any]) -> DeviceDataSource | None:
    """The data this device's own config names (``fedtune-data-*``), or None (a simulated
    device: the simulation's folder for its partition). Read by the device only: the run
    config, which the coordinator writes, cannot point a device at other files."""
    path = node_config.get("fedtune-data-path", "")
    if not path:
        return None
    fmt = str(node_config.get("fedtune-data-format", "auto"))
    if fmt not in DATA_FORMATS:
        raise NodePolicyError(f"fedtune-data-format = {fmt!r}: expected one of "
                              f"{list(DATA_FORMATS)}")
    return DeviceDataSource(Path(str(path)), format=fmt,
                            heldout_fraction=float(node_config.get(
                                "fedtune-data-heldout-fraction", 0.2)),
                            seed=int(node_config.get("fedtune-data-seed", 0)))


def is_edge_client(flat: Mapping[str, Any], context: Context) -> bool:
    """Whether this node is an edge device (ONNX Runtime, forward-only) in this run."""
    config = RunConfig.from_flat(flat)
    return config.edge.is_edge(partition_id(context), config.data.seed)


class NodePolicyError(RuntimeError):
    """The run asks this device for something its owner did not allow; the reason says what.

    Raised inside the ClientApp, it becomes Flower's error reply, which the coordinator
    counts as a failed client for that round.
    """


def apply_node_settings(run_config: Mapping[str, Any], node_config: Mapping[str, Any]
                        ) -> dict[str, Any]:
    """The run config this device trains with: the device's settings win."""
    merged = dict(run_config)
    for run_key in DEVICE_ONLY:
        merged.pop(run_key, None)  # the coordinator's value: never what the device trusts
    for node_key, run_key in NODE_OVERRIDES.items():
        if node_key in node_config and node_config[node_key] != "":
            merged[run_key] = node_config[node_key]
    return merged


def check_node_policy(flat: Mapping[str, Any], node_config: Mapping[str, Any],
                      context: Context) -> None:
    """Fail closed when the run lowers a protection the device requires."""
    if node_config.get("fedtune-require-manifest", False) and not flat.get(
            "security.verify_manifest", True):
        raise NodePolicyError("this device requires a signed base model but the run sets "
                              "security.verify_manifest = false")
    if node_config.get("fedtune-require-secagg", False) and not flat.get(
            "security.secagg", True):
        raise NodePolicyError("this device requires secure aggregation but the run sets "
                              "security.secagg = false")
    kind = node_config.get("fedtune-client-kind", "")
    if kind:
        if kind not in CLIENT_KINDS:
            raise NodePolicyError(f"fedtune-client-kind = {kind!r}: expected one of "
                                  f"{list(CLIENT_KINDS)}")
        assigned = "edge" if is_edge_client(flat, context) else "gpu"
        if assigned != kind:
            raise NodePolicyError(
                f"the run assigns this device ({context.node_config.get('partition-id')}) "
                f"the {assigned} trainer but the device is a {kind} client; adjust "
                "edge.fraction or the device's kind"
            )


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """A device run by ``fedtune client`` (its node config carries ``fedtune-*`` keys); a
    simulated node has none."""
    return any(str(key).startswith("fedtune-") for key in node_config)


def node_settings_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: the device's settings over the run config, then its policy.

    Also logs where the time goes: Flower starts one ClientApp process per message, so
    process start-up (Python, Flower, imports) is paid on every message, before any of
    fedtune's work (``handler``: torch import, base-model load and check, training).
    """
    node_config = dict(context.node_config)
    if not is_deployed(node_config):
        return call_next(msg, context)  # a simulated node: no device settings, no policy
    started = time.perf_counter()
    startup = _process_age_s()
    log_to_stderr(("client", "kernels", "protocols", __name__))
    context.run_config = apply_node_settings(context.run_config, node_config)
    check_node_policy(context.run_config, node_config, context)
    try:
        reply = call_next(msg, context)
    except (LocalDataError, DataFormatError, TemplateError) as err:
        # The details name this device's files and may quote its data: they stay in the
        # device's log; the coordinator's error reply says only what kind of problem it is.
        log.error("%s message: this device's data cannot be used: %s",
                  msg.metadata.message_type, err)
        raise LocalDataError(f"the device's data cannot be used ({type(err).__name__}); the "
                             "device's log says which file and what to fix") from None
    log.info("%s message: process start-up %s s, handler %.1f s", msg.metadata.message_type,
             "?" if startup is None else f"{startup:.1f}", time.perf_counter() - started)
    return reply


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None elsewhere."""
    try:
        fields_after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields_after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None
