"""``fedtune audit``: the leakage audit grid (issue #4, point 7).

For every batch size x local steps x safeguards (off / on) cell, a target client trains with
fedtune's own client code (:mod:`simulations.audit.scenario`), the coordinator's view of its
update is attacked with both attacks of :mod:`simulations.audit.attacks`, and the result is
scored against the target's real tokens (:mod:`simulations.audit.metrics`) beside two
baselines from the same run: a frequency prior (public text only) and a decoy (another
device's text). The adapter the coordinator ends up with is then attacked for membership
(:mod:`simulations.audit.membership`). Outputs: ``audit.json``, ``audit.md`` and
``audit.png`` in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from client.local_data import LocalData
from protocols.run_config import LoraSection
from simulations.audit import metrics
from simulations.audit.attacks import (
    OptimizationSettings,
    TokenBasis,
    bag_of_tokens_scores,
    optimization_attack,
    residual_writer_keys,
    top_k,
)
from simulations.audit.report import Measurement
from simulations.audit.scenario import (
    AuditError,
    Observation,
    Safeguards,
    Scenario,
    exact_blocks,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """The grid and the attacks' settings (the model and data are given separately)."""

    batch_sizes: tuple[int, ...] = (1, 4, 16)
    local_steps: tuple[int, ...] = (1, 5)
    seq_len: int = 16
    learning_rate: float = 1e-3
    seeds: int = 1
    bag_layers: int = field(default=3, metadata={"help": "last layers whose B the bag uses"})
    drop_components: int = field(default=1, metadata={"help": "shared embedding directions"})
    off_freeze_a: bool = field(default=False, metadata={"help": "FFA-LoRA when unprotected"})
    non_members: int = field(default=128, metadata={
        "help": "blocks of devices outside the cohort: membership inference's non-members and "
                "the frequency prior's public text"})
    lora: LoraSection = field(default_factory=LoraSection)
    safeguards: Safeguards = field(default_factory=Safeguards)
    optimization: OptimizationSettings = field(default_factory=OptimizationSettings)

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "local_steps"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name} must be a non-empty list of integers >= 1, "
                                 f"got {values}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.non_members < 1:
            raise ValueError(f"non_members must be >= 1, got {self.non_members}")
        if self.seeds < 1 or self.bag_layers < 1 or self.drop_components < 0:
            raise ValueError(f"need seeds >= 1, bag_layers >= 1, drop_components >= 0; got "
                             f"{self.seeds}, {self.bag_layers}, {self.drop_components}")

    @property
    def cells(self) -> list[tuple[int, int, bool]]:
        return [(b, s, g) for b in self.batch_sizes for s in self.local_steps
                for g in (False, True)]


def choose_clients(pool: Sequence[LocalData], *, seed: int, count: int, tokenizer: Any,
                   batch_size: int, seq_len: int) -> list[LocalData]:
    """``count`` distinct clients with text for ``batch_size`` blocks, in a seeded order;
    the first is the attack's target, then its cohort, then the decoy."""
    chosen: list[LocalData] = []
    for index in np.random.default_rng(seed).permutation(len(pool)):
        data = pool[int(index)]
        try:
            exact_blocks(tokenizer, data.train_texts, batch_size=batch_size, seq_len=seq_len,
                         client_id=data.client_id)
        except AuditError:
            continue
        chosen.append(data)
        if len(chosen) == count:
            return chosen
    raise AuditError(f"only {len(chosen)} of {len(pool)} clients have text for {batch_size} "
                     f"blocks of {seq_len} tokens; {count} are needed (lower the batch size, "
                     "the sequence length or the cohort)")


def run_audit(model_dir: Path, pool: Sequence[LocalData], config: AuditConfig, *,
              threads: int = 1, on_cell: Callable[[str], None] | None = None,
              ) -> tuple[list[Measurement], int]:
    """Run the grid; return every measurement and the vocabulary size."""
    scenario = Scenario(model_dir, lora=config.lora, learning_rate=config.learning_rate,
                        seq_len=config.seq_len, safeguards=config.safeguards,
                        off_freeze_a=config.off_freeze_a, threads=threads)
    bases: dict[int, TokenBasis] = {}
    rows: list[Measurement] = []
    for seed in range(config.seeds):
        tokenizer = scenario.trainer(False)[0].tokenizer
        cohort = config.safeguards.cohort
        clients = choose_clients(pool, seed=seed, count=cohort + 1,
                                 tokenizer=tokenizer, batch_size=max(config.batch_sizes),
                                 seq_len=config.seq_len)
        outsiders = Outsiders.build(pool, clients, tokenizer=tokenizer, seed=seed,
                                    seq_len=config.seq_len, blocks=config.non_members)
        for batch, steps, guarded in config.cells:
            label = (f"seed {seed}, batch {batch}, {steps} step(s), safeguards "
                     f"{'on' if guarded else 'off'}")
            if on_cell:
                on_cell(label)
            start = time.perf_counter()
            obs = scenario.observe(clients[0], clients[1:cohort], batch_size=batch,
                                   local_steps=steps, protected=guarded, seed=seed)
            if id(obs.model) not in bases:
                head = obs.model.get_output_embeddings().weight.detach().numpy()
                bases[id(obs.model)] = TokenBasis.from_output_head(
                    head, drop_components=config.drop_components)
            decoy = outsiders.decoy_truth(clients[cohort], batch)
            bag, opt = _attack(obs, bases[id(obs.model)], config, seed=seed,
                               client=clients[0].client_id, train_seconds=time.perf_counter()
                               - start, decoy=decoy, public=outsiders.blocks)
            unused = outsiders.unused_blocks(clients[0], batch, config.non_members)
            mia = _membership(obs, unused, outsiders.blocks, seed=seed,
                              client=clients[0].client_id)
            rows += [bag, opt, mia]
            log.info("%s: bag recall %.3f (prior %.3f, decoy %.3f), recovery %.3f (prior %.3f, "
                     "decoy %.3f), membership AUC %.3f", label, bag.recall or 0.0,
                     bag.recall_prior or 0.0, bag.recall_decoy or 0.0, opt.recovery or 0.0,
                     opt.recovery_prior or 0.0, opt.recovery_decoy or 0.0, mia.auc or 0.0)
    vocab = next(iter(bases.values())).vocab_size if bases else 0
    return rows, vocab


@dataclass(frozen=True)
class Outsiders:
    """Devices outside the target's cohort: the decoy (one device) and public text (blocks
    of the others), for the baselines and the membership attack's non-members."""

    blocks: npt.NDArray[np.int64]  # (N, S)
    tokenizer: Any
    seq_len: int

    @classmethod
    def build(cls, pool: Sequence[LocalData], chosen: Sequence[LocalData], *, tokenizer: Any,
              seed: int, seq_len: int, blocks: int) -> Outsiders:
        from kernels.causal_lm_data import token_blocks

        taken = {d.client_id for d in chosen}
        found: list[npt.NDArray[np.int64]] = []
        count = 0
        for index in np.random.default_rng([seed, 7919]).permutation(len(pool)):
            data = pool[int(index)]
            if data.client_id in taken or not data.train_texts:
                continue
            own = token_blocks(tokenizer, data.train_texts, seq_len)
            if len(own):
                found.append(own)
                count += len(own)
            if count >= blocks:
                return cls(np.concatenate(found)[:blocks], tokenizer, seq_len)
        raise AuditError(f"devices outside the cohort hold {count} blocks of {seq_len} tokens; "
                         f"{blocks} are needed as non-members (lower --non-members or the "
                         "cohort, or give a larger corpus)")

    def unused_blocks(self, target: LocalData, batch_size: int, limit: int
                      ) -> npt.NDArray[np.int64]:
        """Blocks of the target's own text it did not train on in a cell (its other
        speeches and its held-out ones): non-members from the same speaker, so membership
        inference is not scored on telling speakers apart."""
        from kernels.causal_lm_data import token_blocks

        used = set(exact_blocks(self.tokenizer, target.train_texts, batch_size=batch_size,
                                seq_len=self.seq_len, client_id=target.client_id))
        heldout = tuple(e.text for e in target.heldout if e.text is not None)
        rest = [t for t in (*target.train_texts, *heldout) if t not in used]
        if not rest:
            return np.zeros((0, self.seq_len), dtype=np.int64)
        return token_blocks(self.tokenizer, rest, self.seq_len)[:limit]

    def decoy_truth(self, decoy: LocalData, batch_size: int) -> npt.NDArray[np.int64]:
        """The decoy device's blocks for a cell: as many as the target trained on."""
        from kernels.causal_lm_data import token_blocks

        texts = exact_blocks(self.tokenizer, decoy.train_texts, batch_size=batch_size,
                             seq_len=self.seq_len, client_id=decoy.client_id)
        return token_blocks(self.tokenizer, texts, self.seq_len)


def _attack(obs: Observation, basis: TokenBasis, config: AuditConfig, *, seed: int,
            client: str, train_seconds: float, decoy: npt.NDArray[np.int64],
            public: npt.NDArray[np.int64]) -> tuple[Measurement, Measurement]:
    """Both attacks on one observation, scored against its ground truth and beside the
    frequency prior (a guess from ``public`` text alone) and the ``decoy``'s text."""
    vocab = basis.vocab_size
    distinct = len(metrics.distinct(obs.truth))
    batch = obs.instruction.batch_size

    def measured(attack: str, *, recall: float, recall_chance: float, seconds: float,
                 **extra: Any) -> Measurement:
        base = Measurement(attack=attack, batch_size=batch,
                           local_steps=obs.instruction.local_steps, safeguards=obs.protected,
                           seed=seed, client=client, recovery=None, recovery_chance=None,
                           recall=recall, recall_chance=recall_chance,
                           distinct_tokens=distinct, target_norm=obs.target_norm,
                           seconds=seconds)
        return dataclasses.replace(base, **extra)

    start = time.perf_counter()
    keys = residual_writer_keys(list(obs.update), last_layers=config.bag_layers)
    scores = bag_of_tokens_scores(obs.update, keys, basis)
    picked = top_k(scores, distinct)
    bag = measured("bag", recall=metrics.bag_recall(picked, obs.truth),
                   recall_chance=metrics.bag_chance(obs.truth, vocab),
                   recall_prior=metrics.bag_recall(metrics.frequency_guess(public, distinct),
                                                   obs.truth),
                   recall_decoy=metrics.bag_recall(top_k(scores, len(metrics.distinct(decoy))),
                                                   decoy),
                   seconds=train_seconds + time.perf_counter() - start)
    start = time.perf_counter()
    guess = optimization_attack(obs.model, obs.global_adapter, obs.update, batch_size=batch,
                                seq_len=config.seq_len, prior=scores,
                                settings=config.optimization, seed=seed)
    common = metrics.frequency_guess(public, 1)[0]
    opt = measured("opt", recovery=metrics.token_recovery(guess, obs.truth),
                   recovery_chance=metrics.recovery_chance(vocab),
                   recovery_prior=metrics.token_recovery(np.full_like(obs.truth, common),
                                                         obs.truth),
                   recovery_decoy=metrics.token_recovery(guess, decoy),
                   recall=metrics.bag_recall(guess, obs.truth),
                   recall_chance=1.0 - (1.0 - 1.0 / vocab) ** guess.size,
                   recall_prior=metrics.bag_recall(metrics.frequency_guess(
                       public, len(metrics.distinct(guess))), obs.truth),
                   recall_decoy=metrics.bag_recall(guess, decoy),
                   seconds=time.perf_counter() - start)
    return bag, opt


def _membership(obs: Observation, unused: npt.NDArray[np.int64],
                other_devices: npt.NDArray[np.int64], *, seed: int, client: str) -> Measurement:
    """The loss-ratio membership attack on the adapter the coordinator ends up with:
    members (the blocks the target trained on) against the target's own unused blocks
    (the primary figure: same speaker) and against other devices' blocks."""
    from protocols.codecs import apply_delta
    from simulations.audit import membership

    start = time.perf_counter()
    step = obs.update if not obs.protected else {k: v / obs.cohort
                                                  for k, v in obs.update.items()}
    tuned = apply_delta(obs.global_adapter, step)
    # All blocks in one pass per adapter; then members | own unused | other devices.
    scores = membership.loss_ratio_scores(
        obs.model, obs.global_adapter, tuned, np.concatenate([obs.truth, unused, other_devices]))
    members, own, others = np.split(scores, np.cumsum([len(obs.truth), len(unused)]))
    return Measurement(
        attack="mia", batch_size=obs.instruction.batch_size,
        local_steps=obs.instruction.local_steps, safeguards=obs.protected, seed=seed,
        client=client, recovery=None, recovery_chance=None, recall=None, recall_chance=None,
        distinct_tokens=len(metrics.distinct(obs.truth)), target_norm=obs.target_norm,
        seconds=time.perf_counter() - start,
        auc=membership.roc_auc(members, own) if len(own) else None,
        tpr_at_1pct_fpr=membership.tpr_at_fpr(members, own, 0.01) if len(own) else None,
        auc_other_devices=membership.roc_auc(members, others),
        members=len(members), non_members=len(own))


# -- command line ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from simulations.audit.cli_args import add_arguments

    parser = argparse.ArgumentParser(
        prog="fedtune audit",
        description=(
            "Leakage audit: run text gradient-inversion attacks (an analytic bag-of-tokens "
            "attack and a TAG/DLG optimization attack) and a loss-ratio membership-inference "
            "attack against the updates fedtune's own client code produces, over batch size x "
            "local steps x safeguards off/on, as an honest-but-curious coordinator. Reports "
            "token recovery and recall beside a frequency prior and a decoy measured in the "
            "same run, and membership ROC AUC and TPR at 1%% FPR; writes audit.json, audit.md "
            "and audit.png."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedtune audit`` and ``python -m simulations.audit``."""
    from protocols.environment import configure_environment
    from simulations.audit.cli_args import configure, load_inputs
    from simulations.cli import user_errors

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_environment()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = configure(args)
    except ValueError as err:
        parser.error(str(err))
    errors: tuple[type[BaseException], ...] = (*user_errors(), AuditError)
    try:
        started = time.perf_counter()
        model_dir, pool, settings = load_inputs(args, config)
        out_dir: Path = args.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        rows, vocab = _run_with_progress(model_dir, pool, config, args)
    except errors as err:
        print(f"fedtune audit: error: {err}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - started
    _write_outputs(out_dir, rows, vocab, settings, wall)
    return 0


def _run_with_progress(model_dir: Path, pool: Sequence[LocalData], config: AuditConfig,
                       args: argparse.Namespace) -> tuple[list[Measurement], int]:
    total = config.seeds * len(config.cells)
    if args.no_progress or not sys.stderr.isatty():
        return run_audit(model_dir, pool, config, threads=args.threads)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as progress:
        task = progress.add_task("loading the model", total=total)
        done = [-1]

        def on_cell(label: str) -> None:
            done[0] += 1
            progress.update(task, completed=done[0], description=label)

        result = run_audit(model_dir, pool, config, threads=args.threads, on_cell=on_cell)
        progress.update(task, completed=total, description="done")
    return result


def _write_outputs(out_dir: Path, rows: list[Measurement], vocab: int,
                   settings: dict[str, Any], wall: float) -> None:
    from simulations.audit.report import (
        markdown_table,
        summarize,
        write_json,
        write_markdown,
        write_plot,
    )

    settings = {**settings, "vocab_size": vocab}
    summary = summarize(rows)
    write_json(out_dir / "audit.json", settings=settings, vocab_size=vocab, rows=rows,
               wall_seconds=wall)
    write_markdown(out_dir / "audit.md", summary=summary, settings=settings, wall_seconds=wall)
    write_plot(out_dir / "audit.png", summary)
    print(markdown_table(summary))
    print(f"\n{len(rows)} measurements in {wall:.0f} s; written to {out_dir}/audit.{{json,md,png}}")

