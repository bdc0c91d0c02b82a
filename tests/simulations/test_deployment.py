"""Deployment on Flower's Deployment Engine (issue #5): credentials, command lines, the
config-only FAB, the device policy, and real processes on loopback.

The slow tests start real ``flower-superlink`` / ``flower-supernode`` processes with TLS
and SuperNode authentication on, and stop every process they start (by PID, with its
children) however they end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.local_data import LocalDataError
from client.node.daemon import DaemonConfigError, parse_config
from client.node.supernode import SuperNodeSpec, node_config_arg
from client.node_policy import NodePolicyError, apply_node_settings, check_node_policy
from protocols.processes import (
    ManagedProcess,
    descendants,
    flower_env,
    process_state,
    wait_for,
)
from protocols.run_config import RunConfig
from server.service.certs import make_node_keys, make_tls
from server.service.fab import write_app
from server.service.superlink import SuperLinkSpec


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- credentials ---------------------------------------------------------------------------


def _handshake(ca: Path, cert: Path, key: Path, hostname: str) -> None:
    """A TLS handshake in memory: our server certificate against a client pinning our CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end, out, peer_in in (("client", client, c_out, s_in),
                                        ("server", server, s_out, c_in)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")


def test_dev_certificates_pass_python_tls_verification(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "certs")

    for host in ("127.0.0.1", "localhost"):
        _handshake(files.ca_cert, files.server_cert, files.server_key, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(files.ca_cert, files.server_cert, files.server_key, "10.9.8.7")
    assert files.server_key.stat().st_mode & 0o777 == 0o600
    assert files.ca_key.stat().st_mode & 0o777 == 0o600


def test_certificates_are_reused_unless_forced(tmp_path: Path) -> None:
    first = make_tls(tmp_path).ca_cert.read_bytes()
    assert make_tls(tmp_path).ca_cert.read_bytes() == first  # SuperNodes pin the CA
    assert make_tls(tmp_path, force=True).ca_cert.read_bytes() != first


def test_node_keys_are_what_flower_loads(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    keys = make_node_keys(tmp_path, "node-0")

    assert try_load_public_key(keys.public_key)  # what `flwr supernode register` accepts
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)  # flower-supernode
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert keys.private_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match=r"node name '\.\./x'"):
        make_node_keys(tmp_path, "../x")


def test_certs_command_makes_ca_server_and_node_keys(tmp_path: Path) -> None:
    from server.service import certs

    assert certs.main(["--out", str(tmp_path), "--nodes", "2", "--node", "edge-a"]) == 0
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*"))
    assert names == ["ca.key", "ca.pem", "nodes/edge-a.key", "nodes/edge-a.pub",
                     "nodes/node-0.key", "nodes/node-0.pub", "nodes/node-1.key",
                     "nodes/node-1.pub", "superlink.key", "superlink.pem"]


@pytest.mark.parametrize("module", ["server.service.certs", "server.service.coordinator",
                                    "client.node.daemon"])
def test_entry_points_have_help(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: fedtune" in capsys.readouterr().out


@pytest.mark.parametrize(("script", "says"), [
    ("fedtune-coordinator", "usage: fedtune-coordinator"),
    ("fedtune-client", "usage: fedtune-client"),
])
def test_console_scripts_a_person_would_guess(script: str, says: str, tmp_path: Path) -> None:
    """Installed by pyproject: the same commands as ``fedtune coordinator|client``, with the
    same one-line errors."""
    exe = Path(sys.executable).parent / script
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and says in done.stdout, done.stderr
    missing = tmp_path / "missing.toml"
    done = subprocess.run([str(exe), *(["--config"] if script.endswith("coordinator") else []),
                           str(missing)], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error: "), done.stderr
    assert str(missing) in done.stderr


# --- command lines ---------------------------------------------------------------------------


def test_superlink_command_has_tls_auth_and_sqlite_state(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    spec = SuperLinkSpec("127.0.0.1", 9093, tls, tmp_path / "state.db", tmp_path / "home",
                         tmp_path / "l.log")
    cmd = spec.command()

    assert cmd[0].endswith("flower-superlink") and "--insecure" not in cmd
    for flag, value in (("--ssl-ca-certfile", tls.ca_cert), ("--ssl-certfile", tls.server_cert),
                        ("--ssl-keyfile", tls.server_key), ("--database", tmp_path / "state.db"),
                        ("--port", 9093)):
        assert cmd[cmd.index(flag) + 1] == str(value)
    assert "--enable-supernode-auth" in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    with pytest.raises(ValueError, match="needs TLS"):
        SuperLinkSpec("127.0.0.1", 9093, None, tmp_path / "s.db", tmp_path, tmp_path / "l.log")


def test_node_config_survives_flowers_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    values: dict[str, bool | int | float | str] = {
        "partition-id": 2, "fedtune-cache-dir": "/srv/fed tune/cache",
        "fedtune-require-secagg": True, "fedtune-client-threads": 3}
    assert parse_config_args([node_config_arg(values)]) == values
    with pytest.raises(ValueError, match="cannot carry quotes"):
        node_config_arg({"k": 'a"b'})
    spec = SuperNodeSpec("127.0.0.1:9093", tmp_path / "ca.pem", tmp_path / "n.key", 9094,
                         tmp_path, tmp_path / "n.log", {"partition-id": 0})
    cmd = spec.command()
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "n.key")
    assert "--max-retries" not in cmd, "the SuperNode must keep reconnecting"


def test_flower_processes_get_our_environment(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "home")

    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_stop_ends_the_whole_process_tree(process_tree: ManagedProcess) -> None:
    tree = [process_tree.pid, *descendants(process_tree.pid)]
    assert len(tree) == 2

    process_tree.stop(timeout=5)

    for pid in tree:
        assert process_state(pid) in (None, "Z")


#: Forks a sleeping child every few milliseconds: a tree that grows while it is killed.
_FORKING_TREE = """
import os, sys, time
marker = sys.argv[1]
for _ in range(400):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    time.sleep(0.003)
time.sleep(60)
"""


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and process_state(int(entry.name)) not in (None, "Z"):
            found.append(int(entry.name))
    return found


def test_kill_leaves_no_process_the_tree_forked_while_dying(tmp_path: Path) -> None:
    marker = f"fedtune-kill-test-{os.getpid()}-{time.monotonic_ns()}"
    proc = ManagedProcess("forking", [sys.executable, "-c", _FORKING_TREE, marker],
                          env=dict(os.environ), log_path=tmp_path / "forking.log")
    try:
        wait_for(lambda: len(descendants(proc.pid)) >= 20, timeout=30,
                 what="the tree to grow", process=proc, interval=0.01)
        proc.kill()  # while it still forks
        # SIGKILL is asynchronous: the killed go within moments, a survivor sleeps 60 s.
        wait_for(lambda: not _processes_with(marker), timeout=15,
                 what="no process of the killed tree left", interval=0.05)
    finally:
        for pid in _processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the Flower App bundle ---------------------------------------------------------------------


def test_fab_is_config_only_small_and_carries_the_run_config(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supercore.run import Run

    config = RunConfig.from_nested({"train": {"rounds": 3, "learning_rate": 2e-4},
                                    "security": {"secagg": False}})
    flat: dict[str, Any] = {**config.to_flat(), "paths.run_dir": "/runs/x \"y\"",
                            "paths.manifest_public_key": "ab" * 32}
    write_app(tmp_path / "app", flat, version="0.1.0")

    fab = build_fab_from_disk(tmp_path / "app")  # exactly what `flwr run` submits

    assert len(fab) < 16_000, "weights and data must stay out of the FAB (limit 10 MB)"
    names = set(zipfile.ZipFile(__import__("io").BytesIO(fab)).namelist())
    assert names == {"pyproject.toml", ".info/CONTENT"}
    fused = get_fused_config_from_fab(fab, Run.create_empty(0))
    assert fused == flat
    assert RunConfig.from_flat(fused) == config
    (tmp_path / "app" / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"weights\.bin"):
        write_app(tmp_path / "app", flat, version="0.1.0")


def test_the_fab_carries_the_signed_manifest_a_device_checks_its_own_copy_against(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path
) -> None:
    """What ``fedtune coordinator`` submits (check_inputs -> flower_run_config -> the FAB),
    read back as Flower hands it to a device, over the device's own settings: the device
    verifies its own copy of the base with its pinned key; no manifest file sits in either
    folder."""
    import shutil

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supercore.run import Run

    from client.app import verify_base_model
    from protocols.manifest import ManifestMismatch, SignedManifest, load_public_key
    from protocols.run_config import PathsSection
    from simulations.runner import check_inputs, flower_run_config

    coordinator_model = tmp_path / "coordinator-model"
    shutil.copytree(tiny_model_dir, coordinator_model)
    config = RunConfig.from_nested({"model": {"source": str(coordinator_model)},
                                    "data": {"min_examples": 5}})
    inputs = check_inputs(config, mini_cache)
    assert inputs.signed_manifest and inputs.manifest_public_key
    write_app(tmp_path / "app", flower_run_config(inputs, tmp_path / "run"), version="0.1.0")
    fab = build_fab_from_disk(tmp_path / "app")
    assert len(fab) < 16_000
    fused = get_fused_config_from_fab(fab, Run.create_empty(0))
    assert fused["paths.signed_manifest"] == inputs.signed_manifest

    device_cache = tmp_path / "device-cache"
    device_model = device_cache / "base"
    shutil.copytree(tiny_model_dir, device_model)
    node = {"partition-id": 0, "fedtune-cache-dir": str(device_cache),
            "fedtune-manifest-public-key": inputs.manifest_public_key,
            "fedtune-signed-manifest": "forged"}  # not a device setting: ignored
    paths = PathsSection.from_flat(apply_node_settings(fused, node))
    assert paths.cache_dir == device_cache
    assert paths.signed_manifest == inputs.signed_manifest
    verify_base_model(device_model, paths.manifest_public_key, paths.signed_manifest)
    names = {p.name for folder in (coordinator_model, device_model) for p in folder.iterdir()}
    assert not {n for n in names if n.startswith("fedtune-manifest")}
    pinned = load_public_key(bytes.fromhex(paths.manifest_public_key))
    signed_files = SignedManifest.from_text(paths.signed_manifest).verify(pinned).files
    assert set(signed_files) == {p.name for p in device_model.iterdir()}
    (device_model / "model.safetensors").write_bytes(b"not the coordinator's weights")
    with pytest.raises(ManifestMismatch, match=r"changed files `model\.safetensors`"):
        verify_base_model(device_model, paths.manifest_public_key, paths.signed_manifest)


# --- the device's settings and policy ----------------------------------------------------------


class _Ctx:
    def __init__(self, node_config: dict[str, Any]) -> None:
        self.node_config = node_config


def test_a_device_data_error_reaches_the_coordinator_without_its_details() -> None:
    """The details of a data error name the device's files and may quote its data: they go
    to the device's log; the error reply (what the coordinator sees) only names the kind."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.node_policy import node_settings_mod
    from kernels.data.formats import DataFormatError

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    def handler(msg: Message, context: Context) -> Message:
        raise DataFormatError("/home/ann/diary.jsonl, line 3: message 0 has role 'dear diary'")

    node = {"partition-id": 0, "fedtune-client-threads": 1}
    context = Context(run_id=1, node_id=5, node_config=node, state=RecordDict(),
                      run_config=RunConfig().to_flat())
    msg = Message(RecordDict(), dst_node_id=5, message_type="train")
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("client.node_policy")  # the device's log (its own handler)
    keep = logging.Handler()
    keep.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(keep)
    try:
        with pytest.raises(LocalDataError) as raised:
            node_settings_mod(msg, context, handler)
    finally:
        logger.removeHandler(keep)
    assert "diary" not in str(raised.value) and "DataFormatError" in str(raised.value)
    assert any("/home/ann/diary.jsonl, line 3" in r.getMessage() for r in records)


def test_device_settings_win_over_the_run_config() -> None:
    run = {"paths.cache_dir": "/coordinator/cache", "paths.manifest_public_key": "aa" * 32,
           "federation.client_threads": 4, "train.rounds": 2}
    node = {"partition-id": 1, "fedtune-cache-dir": "/device/cache",
            "fedtune-manifest-public-key": "bb" * 32, "fedtune-client-threads": 1}

    merged = apply_node_settings(run, node)

    assert merged == {"paths.cache_dir": "/device/cache",
                      "paths.manifest_public_key": "bb" * 32,  # the device pins the key
                      "federation.client_threads": 1, "train.rounds": 2}
    assert run["paths.cache_dir"] == "/coordinator/cache", "the input is not mutated"


def test_no_device_setting_replaces_the_signed_manifest() -> None:
    """The coordinator signs the manifest and the device pins the key that checks it: a
    device setting that replaced the manifest would be one more way to change what is
    checked, so none does, whatever the node config holds."""
    from client.node_policy import COORDINATOR_ONLY, NODE_OVERRIDES

    assert "paths.signed_manifest" in COORDINATOR_ONLY
    assert not COORDINATOR_ONLY & set(NODE_OVERRIDES.values())
    run = {"paths.signed_manifest": "from the coordinator"}
    node = {key: "x" for key in NODE_OVERRIDES} | {
        "fedtune-signed-manifest": "x", "fedtune-paths.signed_manifest": "x",
        "paths.signed_manifest": "x", "signed-manifest": "x"}
    assert apply_node_settings(run, node)["paths.signed_manifest"] == "from the coordinator"


def test_a_deployed_device_never_trusts_keys_the_coordinator_names() -> None:
    """The keys that check what the coordinator sends (the base model's manifest key, the
    roster's organisation key) and the device's identity key come from the device's own
    config only: a run config naming them is ignored, even when the device sets none."""
    from client.node_policy import DEVICE_ONLY

    run = {key: "from the coordinator" for key in DEVICE_ONLY} | {"train.rounds": 2}
    assert apply_node_settings(run, {"partition-id": 0}) == {"train.rounds": 2}
    pinned = apply_node_settings(run, {"fedtune-roster-public-key": "cc" * 32})
    assert pinned == {"train.rounds": 2, "paths.roster_public_key": "cc" * 32}


@pytest.mark.parametrize(
    ("node", "run", "reason"),
    [
        ({"fedtune-require-manifest": True}, {"security.verify_manifest": False},
         "requires a signed base model"),
        ({"fedtune-require-secagg": True}, {"security.secagg": False},
         "requires secure aggregation"),
        ({"fedtune-client-kind": "gpu", "partition-id": 0}, {"edge.fraction": 1.0},
         "assigns this device .* the edge trainer"),
        ({"fedtune-client-kind": "phone", "partition-id": 0}, {}, "expected one of"),
    ],
    ids=["manifest", "secagg", "kind", "bad-kind"],
)
def test_device_refuses_a_run_that_lowers_its_protections(
    node: dict[str, Any], run: dict[str, Any], reason: str
) -> None:
    with pytest.raises(NodePolicyError, match=reason):
        check_node_policy(run, node, _Ctx(node))  # type: ignore[arg-type]


def test_device_accepts_a_run_that_meets_its_policy() -> None:
    node = {"fedtune-require-manifest": True, "fedtune-require-secagg": True,
            "fedtune-client-kind": "gpu", "partition-id": 0}
    check_node_policy(RunConfig().to_flat(), node, _Ctx(node))  # type: ignore[arg-type]


# --- the daemon's config -------------------------------------------------------------------------


def test_daemon_config_resolves_paths_and_builds_node_config(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "certs")
    keys = make_node_keys(tmp_path / "certs", "n0")
    raw = {
        "superlink": {"address": "127.0.0.1:9093", "root_ca": "certs/ca.pem"},
        "node": {"name": "n0", "private_key": "certs/nodes/n0.key", "state_dir": "state",
                 "runtime_port": 9100},
        "data": {"path": "mine.jsonl", "format": "chat", "partition_id": 3,
                 "cache_dir": "cache"},
        "privacy": {"manifest_public_key": "cd" * 32, "require_secagg": True},
        "resources": {"threads": 2},
    }

    (tmp_path / "mine.jsonl").write_text('{"messages": []}\n')
    config = parse_config(raw, tmp_path)

    assert config.root_ca == tls.ca_cert and config.private_key == keys.private_key
    assert config.state_dir == tmp_path / "state"
    assert config.node_config() == {
        "partition-id": 3, "fedtune-client-kind": "gpu", "fedtune-client-threads": 2,
        "fedtune-require-manifest": True, "fedtune-require-secagg": True,
        "fedtune-data-path": str(tmp_path / "mine.jsonl"), "fedtune-data-format": "chat",
        "fedtune-data-heldout-fraction": 0.2, "fedtune-data-seed": 0,
        "fedtune-cache-dir": str(tmp_path / "cache"),
        "fedtune-manifest-public-key": "cd" * 32,
    }
    spec = config.supernode_spec()
    cmd = spec.command()
    assert cmd[cmd.index("--port") + 1] == "9100"
    # Flower's SuperNode through our entry point, polling every second instead of 3 s
    assert cmd[1:3] == ["-m", "client.node.supernode_entry"]
    assert spec.environment()["FEDTUNE_SUPERNODE_POLL_S"] == "1.0"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"node": {"state_dir": "s", "colour": "red"}}, "unknown key node.colour"),
        ({"gpu": {}}, r"unknown table \[gpu\]"),
        ({"superlink": {"address": "127.0.0.1:1", "root_ca": "ca.pem", "insecure": True}},
         "exactly one of"),
        ({"node": {"state_dir": "s", "kind": "tpu"}}, "node.kind = 'tpu'"),
        ({"node": {"state_dir": "s", "runtime_port": "9094"}}, "expected int"),
        ({"privacy": {"manifest_public_key": "xyz"}}, "64 hex digits"),
        ({"privacy": {"roster_public_key": "ab" * 31}}, "roster_public_key: expected 64 hex"),
        ({"privacy": {"roster_public_key": "ab" * 32}}, "set both or neither"),
        ({"resources": {"device": "gpu"}}, "resources.device = 'gpu'"),
        ({"node": {}}, "node.state_dir is required"),
        ({"node": {"state_dir": "s", "poll_interval_s": "fast"}},
         "node.poll_interval_s = 'fast': expected float, got str"),
        ({"node": {"state_dir": "s", "poll_interval_s": 10}},
         r"node.poll_interval_s = 10.0: must be in \[0.05, 3\]"),
    ],
    ids=["unknown-key", "unknown-table", "tls-and-insecure", "kind", "type", "key",
         "roster-key", "roster-without-identity", "device", "missing", "poll-type",
         "poll-range"],
)
def test_bad_daemon_config_is_refused_by_name(
    tmp_path: Path, patch: dict[str, Any], message: str
) -> None:
    make_tls(tmp_path)
    raw: dict[str, Any] = {"superlink": {"address": "127.0.0.1:9093", "root_ca": "ca.pem"},
                           "node": {"state_dir": "s"}}
    raw.update(patch)
    with pytest.raises(DaemonConfigError, match=message):
        parse_config(raw, tmp_path)


# --- real processes on loopback ------------------------------------------------------------------


def test_an_interrupted_run_folder_is_reopened_and_finished(tmp_path: Path) -> None:
    from server.run_dir import (
        ResumeError,
        new_run_dir,
        read_run_info,
        reopened_run_dir,
        unfinished_run_dir,
    )

    config = RunConfig.from_nested({})
    with pytest.raises(ResumeError, match="no interrupted run 'r1'"):
        unfinished_run_dir(tmp_path, "r1")
    with pytest.raises(KeyboardInterrupt), new_run_dir(tmp_path, "federated", config, "r1") as d:
        (d / "checkpoint.safetensors").write_bytes(b"kept")
        raise KeyboardInterrupt  # the coordinator stopped mid-run
    assert unfinished_run_dir(tmp_path, "r1") == tmp_path / "r1.failed"
    with reopened_run_dir(tmp_path, "r1") as work:
        assert work == tmp_path / "r1.partial" and not (tmp_path / "r1.failed").exists()
        assert (work / "checkpoint.safetensors").read_bytes() == b"kept"
    info = read_run_info(tmp_path / "r1")
    assert len(info["resumed"]) == 1 and "finished" in info
    with pytest.raises(ResumeError, match="already finished"):
        unfinished_run_dir(tmp_path, "r1")


def test_resume_takes_the_config_from_the_run_folder(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from server.service.coordinator import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", "r1", "--set", "train.rounds=3", "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "drop --config/--set/--name" in capsys.readouterr().err


def _no_flower_left(pids: list[int]) -> None:
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    assert not alive, f"processes left running: {alive}"


@pytest.fixture()
def stopper() -> Iterator[list[ManagedProcess]]:
    """Processes a test started; all are stopped however the test ends."""
    started: list[ManagedProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.mark.slow
def test_superlink_admits_only_registered_nodes_which_survive_its_restart(
    tmp_path: Path, stopper: list[ManagedProcess]
) -> None:
    from client.node.supernode import start_supernode
    from server.service.flwr_cli import FlwrCli, FlwrCliError
    from server.service.superlink import start_superlink

    certs = tmp_path / "certs"
    tls = make_tls(certs)
    member, intruder = make_node_keys(certs, "member"), make_node_keys(certs, "intruder")
    spec = SuperLinkSpec("127.0.0.1", _free_port(), tls, tmp_path / "link" / "state.db",
                         tmp_path / "link" / "flwr", tmp_path / "link" / "superlink.log")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stopper.append(start_superlink(spec))
    timings["superlink_start"] = time.perf_counter() - t0
    cli = FlwrCli(spec.flwr_home)
    cli.write_connection(spec.address, tls.ca_cert)
    node_id = cli.register_node(member.public_key, name="member")
    with pytest.raises(FlwrCliError, match="already in use"):  # what register_keys tolerates
        cli.register_node(member.public_key, name="member")

    daemon_cfg = tmp_path / "member.toml"
    daemon_cfg.write_text(
        f'[superlink]\naddress = "{spec.address}"\nroot_ca = "{tls.ca_cert}"\n'
        f'[node]\nname = "member"\nprivate_key = "{member.private_key}"\n'
        f'state_dir = "{tmp_path / "member"}"\nruntime_port = {_free_port()}\n'
        f'[data]\npath = "{tmp_path}"\n')
    t0 = time.perf_counter()
    daemon = ManagedProcess(
        "daemon", [sys.executable, "-m", "client.node.daemon", str(daemon_cfg)],
        env=dict(os.environ), log_path=tmp_path / "daemon.out")
    stopper.append(daemon)

    def member_online() -> bool:
        return any(n["node-id"] == str(node_id) and n["status"] == "online"
                   for n in cli.nodes())

    wait_for(member_online, timeout=90, what="the registered SuperNode to come online",
             process=daemon, interval=2.0)
    timings["node_online"] = time.perf_counter() - t0

    bad = start_supernode(SuperNodeSpec(spec.address, tls.ca_cert, intruder.private_key,
                                        _free_port(), tmp_path / "intruder",
                                        tmp_path / "intruder.log"), "intruder")
    stopper.append(bad)
    assert bad.popen.wait(timeout=90) != 0, "an unregistered key must be refused"
    assert "Failed to activate SuperNode" in bad.log_tail()
    assert [n["node-id"] for n in cli.nodes()] == [str(node_id)]

    # Coordinator restart: same port, same SQLite state; the SuperNode reconnects by itself.
    # The SuperLink keeps a node "online" for a while after its last heartbeat, so being
    # listed online proves nothing: wait until the SuperNode has seen the outage (Flower's
    # retry warning), then for its retry to succeed against the new SuperLink.
    member_log = tmp_path / "member" / "client.log"
    failed, reconnected = (member_log.read_text().count(line) for line in _RETRY_LINES)
    stopper[0].stop()
    t0 = time.perf_counter()
    wait_for(lambda: member_log.read_text().count(_RETRY_LINES[0]) > failed, timeout=60,
             what="the SuperNode to notice the outage", process=daemon, interval=0.2)
    stopper[0] = start_superlink(spec)
    wait_for(lambda: member_log.read_text().count(_RETRY_LINES[1]) > reconnected
             and member_online(), timeout=120,
             what="the SuperNode to reconnect after the restart", process=daemon, interval=1.0)
    timings["reconnect_after_restart"] = time.perf_counter() - t0
    assert "restarting in" not in (tmp_path / "member" / "daemon.log").read_text(), \
        "the SuperNode itself reconnected; the daemon did not have to restart it"

    tree = [daemon.pid, *descendants(daemon.pid)]
    assert len(tree) >= 3  # daemon -> flower-supernode -> flower-superexec
    os.kill(daemon.pid, signal.SIGTERM)
    # (the daemon allows the SuperNode and the fork server up to 30 s each to stop)
    assert daemon.popen.wait(timeout=75) == 0, "SIGTERM is a clean exit"
    time.sleep(1.0)
    _no_flower_left(tree)
    for proc in stopper:
        proc.stop()
    assert not _processes_using(tmp_path), "Flower processes outlived the test"
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))


#: Flower's retry warnings in a SuperNode's log: a failed request, then its retry succeeding.
_RETRY_LINES = ("Connection attempt failed, retrying in", "Connection successful after")

#: Flower's SuperNode log for an instruction and its reply: "[RUN id, ROUND n]" (the
#: instruction's group id, which fedtune sets to the round), then "Receiving: train message"
#: or "Sending: train message ..." and "Sent successfully".
_RECEIVING_IN_ROUND = r"ROUND {round}\]\s*\n.*Receiving: train message"
_SENT_IN_ROUND = r"ROUND {round}\]\s*\n.*Sending: train message.*\n.*Sent successfully"


def _log_says(supernode_log: Path, pattern: str, server_round: int) -> bool:
    text = supernode_log.read_text() if supernode_log.is_file() else ""
    return re.search(pattern.format(round=server_round), text) is not None


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_deployment_end_to_end_survives_killed_coordinator_and_client(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path
) -> None:
    """1 SuperLink + 3 SuperNodes on loopback, TLS and node authentication on, fedtune's
    ServerApp/ClientApp over 3 rounds with every device in every round, all real processes.
    After round 1 one device is SIGKILLed: round 2 completes with the other two. After
    round 2 the coordinator (SuperLink, SuperExec, ServerApp) is SIGKILLed; the killed
    device comes back, and ``fedtune coordinator --resume`` waits for all three and runs
    round 3 from the checkpoint with the device that rejoined. Every round is counted once
    in the metrics, the checkpoint and the privacy ledger.

    Each device trains on its own files, in its own folder and its own format (a folder of
    .txt files, a JSONL file, a CSV file), named only in its own config; the coordinator
    runs from a cache holding no device data, scores on a file it owns (eval.path), and
    afterwards no file the coordinator side wrote holds a device's secret line."""
    from safetensors.numpy import load_file

    from client.shakespeare import parse_play
    from protocols.config_file import to_toml
    from protocols.privacy.ledger import load_ledger
    from server.checkpoint import load_checkpoint
    from server.service.inputs import check_coordinator_inputs
    from tests.conftest import mini_play

    rounds = 3
    config = RunConfig.from_nested({
        "model": {"source": str(tiny_model_dir)},
        "data": {"min_examples": 5, "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"rounds": rounds, "clients_per_round": 3, "local_steps": 2, "batch_size": 2,
                  "seq_len": 16, "learning_rate": 0.01},
        "eval": {"max_blocks": 4, "batch_size": 4, "fraction_clients": 0.0,
                 "path": str(tmp_path / "coordinator-eval.txt")},
        # Each message is a fresh ClientApp process; SecAgg's three extra stages per round
        # would add minutes on a 2-core runner (docs/deploy.md has the measured cost). The
        # coordinator adds the DP noise (trusted coordinator), so a privacy ledger is kept.
        "security": {"secagg": False},
        "privacy": {"client_dp": True, "clip_norm": 1.0, "noise_multiplier": 0.1},
        # The device killed after being sampled does not hold its round open: the SuperLink
        # answers for it once its heartbeats stop (~45 s); the timeout is only a backstop.
        "federation": {"round_timeout_s": 400.0},
    })
    (tmp_path / "coordinator-eval.txt").write_text(  # public text the coordinator owns
        "O gentle night, that hides the weary town, let every lamp and every care lie down;\n"
        "the river keeps its counsel, cold and deep, and all the bells are silent in their "
        "sleep.\n" * 4)
    speeches = [s.text for s in parse_play(mini_play(), "miniature")]
    secrets = [f"canary{i} {uuid.uuid4().hex} sings" for i in range(3)]
    for i in range(3):  # each device's own data, in its own folder and format
        mine = [*speeches[i::3], *[secrets[i]] * 4]
        folder = tmp_path / f"node-{i}" / "data"
        folder.mkdir(parents=True)
        if i == 0:
            for j, text in enumerate(mine):
                (folder / f"note-{j:02d}.txt").write_text(text)
        elif i == 1:
            (folder / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                        for t in mine))
        else:
            (folder / "notes.csv").write_text("text\n" + "".join(
                '"' + t.replace('"', '""') + '"\n' for t in mine))
    coordinator_cache = tmp_path / "coordinator-cache"  # no corpus, no device data
    # Signs the base; devices pin the key below.
    inputs = check_coordinator_inputs(config, coordinator_cache)
    config_file = tmp_path / "run.toml"
    config_file.write_text(to_toml(config))
    certs = tmp_path / "certs"
    tls = make_tls(certs)
    keys = [make_node_keys(certs, f"node-{i}") for i in range(3)]
    port = _free_port()
    state, runs = tmp_path / "coordinator", tmp_path / "runs"
    run_dir = runs / "deployed.partial"
    procs: dict[str, ManagedProcess] = {}

    def coordinator(*args: str) -> ManagedProcess:
        return ManagedProcess(
            "coordinator",
            [sys.executable, "-m", "server.service.coordinator", "--state-dir", str(state),
             "--certs-dir", str(certs), "--port", str(port), "--cache-dir",
             str(coordinator_cache),
             "--runs-dir", str(runs), "--nodes-timeout", "180", "--run-timeout", "900", *args],
            env=dict(os.environ), log_path=tmp_path / "coordinator.out")

    def device(i: int) -> ManagedProcess:
        toml = tmp_path / f"node-{i}.toml"
        toml.write_text(
            f'[superlink]\naddress = "127.0.0.1:{port}"\nroot_ca = "{tls.ca_cert}"\n'
            f'[node]\nname = "node-{i}"\nprivate_key = "{keys[i].private_key}"\n'
            f'state_dir = "{tmp_path / f"node-{i}"}"\nruntime_port = {_free_port()}\n'
            f'[data]\npath = "{tmp_path / f"node-{i}" / "data"}"\nheldout_fraction = 0.25\n'
            f'partition_id = {i}\ncache_dir = "{mini_cache}"\n'
            f'[privacy]\nmanifest_public_key = "{inputs.manifest_public_key}"\n'
            'require_secagg = false\n')
        return ManagedProcess(
            f"node-{i}", [sys.executable, "-m", "client.node.daemon", str(toml)],
            env=dict(os.environ), log_path=tmp_path / f"node-{i}.out")

    def checkpointed_round() -> int:
        checkpoint = load_checkpoint(run_dir)
        return 0 if checkpoint is None else checkpoint.round

    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    try:
        procs["coordinator"] = coordinator("--config", str(config_file), "--name", "deployed",
                                           "--min-nodes", "3")
        for i in range(3):
            procs[f"node-{i}"] = device(i)
        # A device dies mid-round: round 2 must go on without it. It is killed the moment
        # it starts receiving its round-2 instruction (so it was sampled), long before it
        # could answer (download, ClientApp start, training). Killing it once round 1's
        # metrics appeared raced with round 2: CI saw the device pull, train and answer
        # round 2 within the test's polling interval.
        node_2_log = tmp_path / "node-2" / "client.log"
        wait_for(lambda: _log_says(node_2_log, _RECEIVING_IN_ROUND, 2), timeout=420,
                 what="node-2 to receive its round-2 instruction", process=procs["node-2"],
                 interval=0.01)
        procs["node-2"].kill()
        assert not _log_says(node_2_log, _SENT_IN_ROUND, 2), "node-2 answered before it died"
        marks["round_1"] = time.perf_counter() - t0
        wait_for(lambda: any(r["round"] == 2 for r in _rows(run_dir))
                 and checkpointed_round() == 2, timeout=420,
                 what="round 2 to complete", process=procs["coordinator"], interval=2.0)
        marks["round_2"] = time.perf_counter() - t0

        procs["coordinator"].kill()  # power cut on the coordinator host
        killed_at = load_checkpoint(run_dir)
        assert killed_at is not None and killed_at.round == 2
        assert not (runs / "deployed").exists()

        procs["node-2"] = device(2)  # the killed device comes back ...
        # ... and the resumed run waits for all three devices: it cannot start without it.
        procs["coordinator"] = coordinator("--resume", "deployed", "--min-nodes", "3")
        assert procs["coordinator"].popen.wait(timeout=600) == 0, \
            procs["coordinator"].log_tail()
        marks["finished"] = time.perf_counter() - t0
    finally:
        for proc in procs.values():
            proc.stop()

    final = runs / "deployed"
    rows = _rows(final)
    numbers = [r["round"] for r in rows]
    # Every round counted once: numbers strictly increase, and exactly `rounds` completed.
    assert numbers[0] == 0 and numbers == sorted(set(numbers)) and len(numbers) == rounds + 1
    for row in rows[1:]:
        assert row["rejected"] == 0
        assert 0 < row["bytes_up"] < row["bytes_down"]
    by_round = {r["round"]: r for r in rows}
    assert all(np.isfinite(r["perplexity"]) for r in rows)  # scored on eval.path
    # The coordinator's terminal (a file here, so plain lines) shows every round's progress.
    out = (tmp_path / "coordinator.out").read_text()
    assert re.search(r"^deployed: round 3/3: 3 clients, 0 failed, 0 rejected, perplexity "
                     r"[\d.]+, epsilon [\d.e+-]+, \d+ s$", out, re.MULTILINE), out[-2000:]
    assert by_round[1]["clients"] == 3 and by_round[1]["failed"] == 0
    # the round the device died in completed with the other two; the killed device's
    # message came back as an error (SuperLink: node unavailable) or never (round timeout)
    assert by_round[2]["clients"] == 2 and by_round[2]["sampled"] == 3
    assert by_round[numbers[-1]]["clients"] == 3, "the device that rejoined trained again"
    ledger = load_ledger(final / "privacy_ledger.json")
    spent = [entry.round for entry in ledger.history]
    # ε is spent once per aggregate: every logged round, plus at most the one round whose
    # aggregate existed when the coordinator died (re-run under a new number, never reused).
    assert spent == sorted(set(spent)) and set(numbers[1:]) <= set(spent)
    assert len(spent) <= rounds + 1
    checkpoint = load_checkpoint(final)
    assert checkpoint is not None and checkpoint.round == numbers[-1]
    assert checkpoint.completed == rounds
    saved = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(checkpoint.adapter)
    for key, value in checkpoint.adapter.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    assert any(not np.array_equal(value, killed_at.adapter[key])
               for key, value in checkpoint.adapter.items()), "no training after the restart"
    deployment = json.loads((final / "deployment.json").read_text())
    assert deployment["status"] == "finished:completed"
    assert [a["status"] for a in deployment["earlier_attempts"]] == ["running"]
    assert deployment["earlier_attempts"][0]["run_id"] != deployment["run_id"]
    for i in range(3):  # every device connected over TLS with its registered key
        assert "SuperNode ID:" in (tmp_path / f"node-{i}" / "client.log").read_text()
    # The killed device's second life connected again, under the same registered key.
    assert (tmp_path / "node-2" / "client.log").read_text().count("SuperNode ID:") >= 2

    from peft import PeftModel

    from kernels.base_model import load_causal_lm

    PeftModel.from_pretrained(load_causal_lm(tiny_model_dir).model, final / "adapter")
    print("marks (s):", json.dumps({k: round(v, 1) for k, v in marks.items()}),
          "phases (s):", json.dumps(deployment["phases_s"]))
    print("round_s:", [round(r["round_s"], 1) for r in rows[1:]],
          "clients:", [r["clients"] for r in rows[1:]],
          "failed:", [r["failed"] for r in rows[1:]],
          "dropped/timed out:", [r["sampled"] - r["clients"] - r["failed"] for r in rows[1:]])
    time.sleep(1.0)
    assert not _processes_using(tmp_path), "Flower processes outlived the test"
    # The coordinator side never held device data: nothing it wrote (its SuperLink state,
    # app bundles, logs, run folder, cache) contains any device's secret line, and its run
    # config names no device file.
    assert not (coordinator_cache / "devices").exists()
    for root in (state, runs, coordinator_cache):
        for file in (f for f in root.rglob("*") if f.is_file()):
            content = file.read_bytes()
            for secret in secrets:
                assert secret.split()[1].encode() not in content, f"{secret} in {file}"
            assert b"node-0/data" not in content, f"a device's data path in {file}"


def _processes_using(folder: Path) -> list[int]:
    """Live processes whose FLWR_HOME lies under ``folder``: everything Flower started for
    this test (SuperLink, SuperNodes, SuperExecs, ServerApp, ClientApps) inherits it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(v.startswith(b"FLWR_HOME=" + str(folder).encode())
                                for v in environ):
            found.append(int(entry.name))
    return found
