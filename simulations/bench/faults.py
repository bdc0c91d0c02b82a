"""Fault benchmark: simulations stopped or crippled at random moments, resumed automatically,
checked against a run that never was.

    python -m simulations.bench.faults                          # 2 runs per fault, 4 rounds
    python -m simulations.bench.faults --faults sighup,kill --runs 3

Each fault run is the same ``fedtune simulate`` as an uninterrupted reference run (one per
benchmark), hit once at a random moment after a random round's checkpoint (seeded with
``--seed``):

- ``worker``: SIGKILL of one ClientApp worker (a Ray actor process), as Ray's
  out-of-memory killer does; the run goes on by itself;
- ``sighup``: SIGHUP of ``fedtune simulate`` (a closed terminal); resumed with ``--resume``;
- ``kill``: SIGKILL of ``fedtune simulate`` with its whole process group (a power cut);
  resumed with ``--resume``;
- ``daemon``: on the Deployment Engine (``fedtune coordinator`` and one ``fedtune client``
  daemon per device, real processes on loopback with TLS and node authentication, edge
  devices on a tiny model: :mod:`simulations.bench.deploy_load`'s set-up), SIGKILL of one
  device's daemon, which is started again at once (its SuperNode and ClientApps died with
  it); the run goes on by itself;
- ``coordinator``: on the same deployment, SIGKILL of the coordinator with its SuperLink and
  ServerApp (a power cut on the coordinator host); resumed with ``fedtune coordinator
  --resume`` while the devices stay up.

Per fault it reports rounds lost (fewer rounds that trained than were asked for: a round
missing from ``metrics.jsonl``, or one that trained nothing even after its retries),
rounds repeated (a round logged twice), updates double-counted (a round whose accepted +
failed + rejected clients exceed the sampled ones, or, for the simulations a resume makes
invisible, a final adapter that differs from the reference), and privacy spend
double-counted (a round in the ε ledger twice; simulated runs use client-level DP only with
``--dp``, where sampling is secret and adapters cannot be compared; deployed runs have no
DP). All should be zero; a kill costs at most the updates of the devices it hit in the round
it hit (counted as failed), and the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FAULTS = ("worker", "sighup", "kill", "daemon", "coordinator")
RESUMED = ("sighup", "kill")  # simulations resumed from a checkpoint: adapters comparable
DEPLOYED = ("daemon", "coordinator")


@dataclass
class Outcome:
    """What one fault run did to its rounds, its updates and its privacy ledger."""

    fault: str
    hit_after_round: int
    rounds_lost: int = 0
    rounds_repeated: int = 0
    double_counted: int = 0
    privacy_double_spent: int = 0
    failed_clients: int = 0
    equal_to_reference: bool | None = None
    notes: list[str] = field(default_factory=list)


def _simulate(args: argparse.Namespace, *extra: str) -> list[str]:
    sets = [item for s in args.set for item in ("--set", s)]
    base = [sys.executable, "-m", "simulations.cli", "simulate", "--no-progress",
            "--runs-dir", str(args.runs_dir)]
    if args.cache_dir is not None:
        base += ["--cache-dir", str(args.cache_dir)]
    if "--resume" in extra:
        return [*base, *extra]
    return [*base, *extra, "--set", f"train.rounds={args.rounds}",
            *(["--set", "privacy.client_dp=true"] if args.dp else []), *sets]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _checkpointed(run_dir: Path) -> int:
    from server.checkpoint import load_checkpoint

    try:
        checkpoint = load_checkpoint(run_dir) if run_dir.is_dir() else None
    except Exception:  # a checkpoint being replaced right now: look again
        return 0
    return 0 if checkpoint is None else checkpoint.round


def _session(sid: int, marker: bytes = b"") -> list[int]:
    """Processes of the session ``sid`` (a run started with its own session: the
    ``simulate`` process, Ray's daemons and workers) whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            session = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if session == sid and marker in cmdline:
            found.append(int(entry.name))
    return found


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session (a power cut; Ray daemons included)."""
    for pid in _session(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run_with_fault(args: argparse.Namespace, fault: str, name: str, after: int,
                    rng: np.random.Generator) -> Outcome:
    """Start a run, hit it once after round ``after`` is checkpointed, finish it."""
    outcome = Outcome(fault, after)
    run = subprocess.Popen(_simulate(args, "--name", name), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=_env(),
                           start_new_session=True)  # its own session: workers are found by it
    partial = args.runs_dir / f"{name}.partial"
    deadline = time.monotonic() + args.timeout
    while _checkpointed(partial) < after:
        if run.poll() is not None or time.monotonic() > deadline:
            _kill_session(run.pid)
            raise RuntimeError(f"{name}: ended or stalled before round {after} "
                               f"(status {run.poll()})")
        time.sleep(0.2)
    time.sleep(float(rng.uniform(0.0, args.jitter_s)))  # somewhere inside the next round
    if fault == "worker":
        workers = _session(run.pid, b"ClientAppActor")
        if workers:
            os.kill(int(rng.choice(workers)), signal.SIGKILL)
        else:
            outcome.notes.append("no worker alive at the moment of the kill")
        _, err = run.communicate(timeout=args.timeout)
        if run.returncode not in (0, 3):
            raise RuntimeError(f"{name}: exited {run.returncode}: {err[-2000:]}")
        return outcome
    if fault == "sighup":
        run.send_signal(signal.SIGHUP)
        run.communicate(timeout=args.timeout)
        if run.returncode != 128 + signal.SIGHUP:
            outcome.notes.append(f"exited {run.returncode} after SIGHUP (finished first?)")
    else:  # kill: the whole session at once, no chance to clean up
        _kill_session(run.pid)
        run.communicate(timeout=60)
    if not (args.runs_dir / name).is_dir():
        resumed = subprocess.run(_simulate(args, "--resume", name), capture_output=True,
                                 text=True, env=_env(), timeout=args.timeout)
        if resumed.returncode not in (0, 3):
            raise RuntimeError(f"{name}: resume exited {resumed.returncode}: "
                               f"{resumed.stderr[-2000:]}")
    return outcome


def _deployed_run_with_fault(args: argparse.Namespace, fault: str, name: str, after: int,
                             rng: np.random.Generator) -> tuple[Outcome, Path]:
    """A deployed run (coordinator + ``--nodes`` device daemons) hit once after round
    ``after`` is checkpointed; return the outcome and the finished run folder."""
    from simulations.bench import deploy_load

    outcome = Outcome(fault, after)
    setup = argparse.Namespace(
        nodes=args.nodes, rounds=args.rounds, clients_per_round=min(2, args.nodes),
        edge_steps=2, secagg=False, round_timeout=300.0, model=None, warm_clientapp=None,
        interval=1.0, max_starting=args.nodes, timeout=args.timeout)
    # A short folder of its own: Unix socket paths (the warm launcher's) allow 107 bytes.
    root = Path(tempfile.mkdtemp(prefix=f"fedtune-{fault}-"))
    ws = deploy_load.prepare(setup, root)
    run = deploy_load.LoadRun(setup, ws, time.monotonic() + args.timeout)
    partial = ws.runs_dir / f"{deploy_load.RUN_NAME}.partial"
    try:
        run.start_coordinator()
        run.wait_until(run.keys_registered, "the coordinator to register the device keys",
                       limit=deploy_load.REGISTER_WAIT_S + 3.0 * args.nodes)
        run.start_devices()
        run.wait_until(lambda: _checkpointed(partial) >= after, f"round {after}'s checkpoint")
        time.sleep(float(rng.uniform(0.0, args.jitter_s)))  # somewhere inside the next round
        assert run.coordinator is not None
        if fault == "daemon":
            victim = str(rng.choice(sorted(run.devices)))
            outcome.notes.append(f"killed {victim}'s daemon")
            run.devices[victim].kill()
            run.start_device(victim)
        elif not run.coordinator.alive():
            outcome.notes.append("the run finished before the kill")
        else:
            run.coordinator.kill()
            run.start_coordinator(resume=True)
        code = run.coordinator.popen.wait(timeout=run.remaining())
        if code not in (0, 3):
            raise RuntimeError(f"{name}: the coordinator exited {code} (processes' logs in "
                               f"{root}): {run.coordinator.log_tail(2000)}")
    finally:
        run.stop_all()
    run_dir = args.runs_dir / name
    shutil.move(ws.runs_dir / deploy_load.RUN_NAME, run_dir)
    shutil.move(ws.root / "coordinator.out", run_dir / "coordinator.out")
    shutil.rmtree(root, ignore_errors=True)
    return outcome, run_dir


def check(outcome: Outcome, run_dir: Path, rounds: int, reference: Path | None) -> Outcome:
    """Fill in the counts from the finished run folder (and the reference run's)."""
    from protocols.privacy.ledger import load_ledger
    from server.metrics_log import read_metrics
    from server.run_summary import summarize

    rows = read_metrics(run_dir)
    numbers = [r["round"] for r in rows]
    outcome.rounds_repeated = len(numbers) - len(set(numbers))
    # The run's own summary: a Poisson sample that drew no device (client-level DP) is not
    # lost; a resumed deployment may number its rounds past a gap: count, not numbers.
    summary = summarize(run_dir)
    outcome.rounds_lost = max(0, rounds - len(set(summary.trained)) - len(set(summary.empty)))
    outcome.failed_clients = summary.failed
    outcome.double_counted = sum(
        1 for r in rows if r["round"] > 0
        and r.get("clients", 0) + r.get("failed", 0) + r.get("rejected", 0) > r.get("sampled", 0))
    ledger_path = run_dir / "privacy_ledger.json"
    if ledger_path.is_file():
        spent = [e.round for e in load_ledger(ledger_path).history]
        outcome.privacy_double_spent = len(spent) - len(set(spent))
    if reference is not None and outcome.fault in RESUMED:
        outcome.equal_to_reference = _same_adapter(run_dir, reference)
        if not outcome.equal_to_reference:
            outcome.double_counted += 1
    return outcome


def _same_adapter(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    one = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    return one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)


def run_benchmark(args: argparse.Namespace) -> list[Outcome]:
    rng = np.random.default_rng(args.seed)
    reference = None
    simulated = [f for f in args.faults if f not in DEPLOYED]
    if simulated and not args.dp:  # with secret sampling there is nothing to compare with
        done = subprocess.run(_simulate(args, "--name", f"{args.prefix}-reference"),
                              capture_output=True, text=True, env=_env(), timeout=args.timeout)
        if done.returncode != 0:
            raise RuntimeError(f"reference run exited {done.returncode}: {done.stderr[-2000:]}")
        reference = args.runs_dir / f"{args.prefix}-reference"
    outcomes = []
    for fault in args.faults:
        for i in range(args.runs):
            name = f"{args.prefix}-{fault}-{i}"
            after = int(rng.integers(1, args.rounds))  # hit inside rounds 2..R
            if fault in DEPLOYED:
                outcome, run_dir = _deployed_run_with_fault(args, fault, name, after, rng)
            else:
                outcome = _run_with_fault(args, fault, name, after, rng)
                run_dir = args.runs_dir / name
            outcomes.append(check(outcome, run_dir, args.rounds, reference))
            print(f"{name}: hit after round {after}: {_line(outcome)}", file=sys.stderr)
    return outcomes


def _line(o: Outcome) -> str:
    same = "-" if o.equal_to_reference is None else ("yes" if o.equal_to_reference else "NO")
    return (f"lost {o.rounds_lost}, repeated {o.rounds_repeated}, double-counted "
            f"{o.double_counted}, privacy double-spent {o.privacy_double_spent}, failed "
            f"clients {o.failed_clients}, adapter = reference: {same}")


def render(outcomes: list[Outcome]) -> str:
    head = (f"{'fault':<11} {'runs':>4} {'rounds lost':>11} {'repeated':>8} "
            f"{'double-counted':>14} {'privacy 2x':>10} {'failed clients':>14} "
            f"{'= reference':>11}")
    lines = [head, "-" * len(head)]
    for fault in dict.fromkeys(o.fault for o in outcomes):
        mine = [o for o in outcomes if o.fault == fault]
        same = [o.equal_to_reference for o in mine if o.equal_to_reference is not None]
        lines.append(
            f"{fault:<11} {len(mine):>4} {sum(o.rounds_lost for o in mine):>11} "
            f"{sum(o.rounds_repeated for o in mine):>8} "
            f"{sum(o.double_counted for o in mine):>14} "
            f"{sum(o.privacy_double_spent for o in mine):>10} "
            f"{sum(o.failed_clients for o in mine):>14} "
            f"{(f'{sum(same)}/{len(same)}' if same else '-'):>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.faults",
        description="Runs hit by random faults (simulations: worker kill, SIGHUP, power cut; "
        "deployments: device daemon kill, coordinator power cut), resumed automatically and "
        "checked for lost, repeated and double-counted rounds and privacy spend.")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        type=lambda s: [f for f in s.split(",") if f],
                        help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--runs", type=int, default=2, help="runs per fault")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=3,
                        help="devices of a deployed run (daemon and coordinator faults)")
    parser.add_argument("--seed", type=int, default=0, help="fixes when each fault hits")
    parser.add_argument("--jitter-s", type=float, default=3.0,
                        help="the fault hits up to this long after the round's checkpoint")
    parser.add_argument("--dp", action="store_true",
                        help="client-level DP on: check the privacy ledger (sampling is "
                             "secret then, so adapters are not compared)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every simulated run (e.g. a smaller "
                             "model); deployed runs use deploy_load's tiny edge set-up")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--prefix", default="faults")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds any one run may take")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: a fault hits after a round's checkpoint, "
                     "inside a later round")
    if set(args.faults) & set(DEPLOYED) and not 2 <= args.nodes <= 20:
        parser.error("--nodes must be in 2..20 for the deployed faults (a round trains two "
                     "devices; each device is a daemon, a SuperNode and ClientApp processes)")
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; choose from {list(FAULTS)}")
    args.runs_dir = args.runs_dir.resolve()
    outcomes = run_benchmark(args)
    print(render(outcomes))
    result: dict[str, Any] = {"rounds": args.rounds, "seed": args.seed, "dp": args.dp,
                              "runs": [o.__dict__ for o in outcomes]}
    out = args.runs_dir / f"{args.prefix}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    bad = sum(o.rounds_lost + o.rounds_repeated + o.double_counted + o.privacy_double_spent
              for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
