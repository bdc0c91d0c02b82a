"""Command-line options of ``fedtune audit`` and turning them into an audit's inputs."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols.cache_dir import add_cache_dir_argument
from protocols.run_config import BUILTIN_SOURCES
from simulations.audit.attacks import DISTANCES, UPDATE_MODELS, OptimizationSettings
from simulations.audit.scenario import NOISE_PLACEMENTS, Safeguards

if TYPE_CHECKING:
    from client.local_data import LocalData
    from protocols.run_config import DataSection
    from simulations.audit.run import AuditConfig

#: Default depth of the audited SmolLM2: its first 4 of 30 decoder layers, with the real
#: embeddings, final norm and tied output head (see simulations.audit.models for why).
DEFAULT_LAYERS = 4


@dataclass(frozen=True)
class GridPreset:
    batch_sizes: tuple[int, ...]
    local_steps: tuple[int, ...]
    opt_iters: int


QUICK = GridPreset(batch_sizes=(1, 4), local_steps=(1,), opt_iters=6)
FULL = GridPreset(batch_sizes=(1, 4, 16), local_steps=(1, 5), opt_iters=10)

EPILOG = """\
threat model: the attacker is the honest-but-curious coordinator (docs/architecture.md). It
knows the public base model, the round's global adapter and the training hyper-parameters.
Safeguards off, it sees one client's raw update; safeguards on (fedtune's privacy preset),
FFA-LoRA updates clipped to C, distributed Gaussian noise (std sigma*C on the aggregate) and
secure aggregation: it sees only the sum over a cohort of m clients.

examples:
  fedtune audit                          # real SmolLM2 (first 4 layers), full grid
  fedtune audit --quick --model tiny     # seconds: tiny random model, reduced grid
  fedtune audit --layers 0 --quick       # all 30 SmolLM2 layers (slow on a CPU)
  fedtune audit --cohort 2 --noise-multiplier 0.8 --clip-norm 0.5   # match a run's preset
  fedtune audit --data my-clients/ --quick   # your texts: one client per .jsonl file
"""


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", default="smollm2-135m-instruct",
                      help="'smollm2-135m-instruct' (prepared by `fedtune prepare`), 'tiny' (a "
                           "random-init tiny Llama built on the fly) or a local HF model folder "
                           "(default: %(default)s)")
    what.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                      help="keep the first N decoder layers of the model, 0 = all; the full "
                           "SmolLM2 grid takes far longer than 10 minutes on 2 CPU cores "
                           "(default: %(default)s)")
    what.add_argument("--config", type=Path, default=None,
                      help="TOML run config whose [lora], [data] and train.learning_rate the "
                           "audit uses (default: simulations/configs/default.toml)")
    what.add_argument("--data", default=None, metavar="PATH",
                      help="the clients' texts: a data source as data.source takes it (a file "
                           "or folder, or 'shakespeare' / 'chatterbot'), made into devices as "
                           "the config's [data] says; a path the config does not say how to "
                           "partition gets one device per file (default: the config's [data]; "
                           "plain documents only, conversations are left out)")
    add_cache_dir_argument(what)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--quick", action="store_true",
                      help=f"reduced grid: batch sizes {_csv(QUICK.batch_sizes)}, local steps "
                           f"{_csv(QUICK.local_steps)}, {QUICK.opt_iters} optimisation steps")
    grid.add_argument("--batch-sizes", type=_ints, default=None, metavar="B,B,...",
                      help=f"default: {_csv(FULL.batch_sizes)}")
    grid.add_argument("--local-steps", type=_ints, default=None, metavar="S,S,...",
                      help=f"default: {_csv(FULL.local_steps)}")
    grid.add_argument("--seq-len", type=int, default=16,
                      help="tokens per sequence (default: %(default)s)")
    grid.add_argument("--learning-rate", type=float, default=None,
                      help="client AdamW learning rate (default: the config's)")
    grid.add_argument("--seeds", type=int, default=1,
                      help="target clients per cell, each a different role "
                           "(default: %(default)s)")
    guard = parser.add_argument_group("safeguards (set them to the privacy preset audited)")
    guard.add_argument("--cohort", type=int, default=10,
                       help="m: clients in one secure sum (default: %(default)s)")
    guard.add_argument("--clip-norm", type=float, default=1.0,
                       help="C: L2 bound of a client update (default: %(default)s)")
    guard.add_argument("--noise-multiplier", type=float, default=1.0,
                       help="sigma: the aggregate's noise std is sigma*C (default: %(default)s)")
    guard.add_argument("--noise-at", choices=NOISE_PLACEMENTS, default="clients",
                       help="who adds the noise: 'clients' (distributed DP, as fedtune's secure "
                            "aggregation does) or 'coordinator' (ablation: the attack sees the "
                            "noise-free secure sum of clipped updates) (default: %(default)s)")
    guard.add_argument("--off-adapter", choices=("config", "lora", "ffa"), default="config",
                       help="adapter when safeguards are off: as the config's lora.freeze_a "
                            "says, plain LoRA, or FFA-LoRA (default: %(default)s)")
    attack = parser.add_argument_group("attacks")
    attack.add_argument("--opt-iters", type=int, default=None,
                        help=f"optimisation steps per attack (default: {FULL.opt_iters})")
    attack.add_argument("--opt-step-size", type=float, default=0.3,
                        help="Adam step on the relaxed tokens (default: %(default)s)")
    attack.add_argument("--distance", choices=DISTANCES, default="tag",
                        help="update-matching distance (default: %(default)s)")
    attack.add_argument("--update-model", choices=UPDATE_MODELS, default="adam",
                        help="how the attacker turns a gradient into the client's step "
                             "(default: %(default)s)")
    attack.add_argument("--candidates", type=int, default=0,
                        help="tokens from the bag the optimisation picks from, 0 = 2 x batch "
                             "x seq-len (default: %(default)s)")
    attack.add_argument("--lm-weight", type=float, default=0.0,
                        help="weight of LAMP's language-model prior (the global model's own "
                             "loss on the dummy text) in the objective (default: %(default)s)")
    attack.add_argument("--bag-layers", type=int, default=3,
                        help="last decoder layers whose o_proj/down_proj B the bag-of-tokens "
                             "attack reads (default: %(default)s)")
    attack.add_argument("--drop-components", type=int, default=1,
                        help="leading shared embedding directions removed before scoring "
                             "(default: %(default)s)")
    attack.add_argument("--non-members", type=int, default=128,
                        help="blocks of devices outside the cohort: the membership attack's "
                             "non-members and the frequency prior's public text "
                             "(default: %(default)s)")
    out = parser.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=None,
                     help="where audit.json/.md/.png go (default: runs/audit-<time>)")
    out.add_argument("--threads", type=int, default=1,
                     help="torch threads (default: %(default)s)")
    out.add_argument("--no-progress", action="store_true", help="plain log output only")
    out.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def configure(args: argparse.Namespace) -> AuditConfig:
    """The :class:`AuditConfig` the options describe; ``ValueError`` names a bad one."""
    from protocols.config_file import load_config
    from simulations.audit.run import AuditConfig

    preset = QUICK if args.quick else FULL
    run_config = load_config(args.config)
    if run_config.lora.kind != "lora":
        # The attacks read LoRA's B of the residual-writing modules (audit/attacks.py).
        raise ValueError(f"the leakage audit attacks LoRA updates; {args.config} sets "
                         f"lora.kind = {run_config.lora.kind!r}: audit with lora.kind = 'lora'")
    if args.out_dir is None:
        args.out_dir = Path("runs") / time.strftime("audit-%Y%m%d-%H%M%S")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    return AuditConfig(
        batch_sizes=args.batch_sizes or preset.batch_sizes,
        local_steps=args.local_steps or preset.local_steps,
        seq_len=args.seq_len,
        learning_rate=args.learning_rate or run_config.train.learning_rate,
        seeds=args.seeds,
        bag_layers=args.bag_layers,
        drop_components=args.drop_components,
        non_members=args.non_members,
        off_freeze_a=(run_config.lora.freeze_a if args.off_adapter == "config"
                      else args.off_adapter == "ffa"),
        lora=run_config.lora,
        safeguards=Safeguards(cohort=args.cohort, clip_norm=args.clip_norm,
                              noise_multiplier=args.noise_multiplier, noise_at=args.noise_at),
        optimization=OptimizationSettings(
            iterations=preset.opt_iters if args.opt_iters is None else args.opt_iters,
            step_size=args.opt_step_size, distance=args.distance,
            update_model=args.update_model, candidates=args.candidates,
            lm_weight=args.lm_weight),
    )


def audit_data(args: argparse.Namespace) -> DataSection:
    """The ``[data]`` the audit's client pool is made from: the config's, with ``--data`` as
    its source. A path source that the config does not say how to partition (``'natural'``
    without ``partition_by``) gets one device per file."""
    from protocols.config_file import load_config
    from protocols.run_config import DataSection

    data = load_config(args.config).data
    if args.data is None:
        return data
    values = {**data.to_mapping(), "source": str(args.data)}
    if (values["source"] not in BUILTIN_SOURCES and values["partition"] == "natural"
            and not values["partition_by"]):
        values["partition_by"] = "file"
    return DataSection(**values)


def load_inputs(args: argparse.Namespace, config: AuditConfig,
                ) -> tuple[Path, list[LocalData], dict[str, Any]]:
    """The model folder, the client texts and the settings to record in ``audit.json``."""
    from client.local_data import DeviceDataSource, load_device_data
    from kernels.base_model import resolve_model_dir
    from protocols.cache_dir import default_cache_dir
    from simulations.audit.models import tiny_model, truncated_model
    from simulations.devices import prepare_devices

    cache = args.cache_dir or default_cache_dir()
    data = audit_data(args)
    devices = prepare_devices(data, cache)
    pool = [load_device_data(DeviceDataSource(devices.folder(i)), devices.names[i])
            for i in range(devices.num_clients)]
    audit_models = cache / "models" / "audit"
    if args.model == "tiny":
        model_dir = tiny_model([t for d in pool for t in d.train_texts], audit_models / "tiny")
        layers_note = "random-init tiny Llama"
    else:
        source = resolve_model_dir(args.model, cache)
        model_dir = truncated_model(source, args.layers, audit_models)
        layers_note = ("all layers" if model_dir == source
                       else f"first {args.layers} decoder layers, real weights")
    settings = {"model": args.model, "model_dir": str(model_dir), "layers": args.layers,
                "layers_note": layers_note, "data": data.to_mapping(),
                "devices_dir": str(devices.root),
                "off_adapter": "FFA-LoRA" if config.off_freeze_a else "plain LoRA",
                **json.loads(json.dumps(asdict(config)))}
    return model_dir, pool, settings
