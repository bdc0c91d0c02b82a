"""The leakage audit: its attacks leak without safeguards and fall below guessing with them.

Everything runs on a tiny random-init Llama (built from the synthetic texts below) through
the real client trainer, clipping and secure-aggregation code, with a reduced grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.local_data import LocalData
from kernels.causal_lm_data import token_blocks
from kernels.data.examples import Example
from protocols.run_config import DataSection, LoraSection
from simulations.audit import metrics
from simulations.audit.attacks import (
    OptimizationSettings,
    TokenBasis,
    bag_of_tokens_scores,
    matching_distance,
    optimization_attack,
    residual_writer_keys,
    top_k,
)
from simulations.audit.models import tiny_model
from simulations.audit.run import build_parser, main
from simulations.audit.scenario import AuditError, Safeguards, Scenario, exact_blocks, secure_sum
from tests.measured import THREADS, within

torch.set_num_threads(THREADS)

COHORT = 6
SEQ_LEN = 16


def _clients(n: int = 12, speeches: int = 30) -> list[LocalData]:
    """``n`` clients speaking a seeded pseudo-language with a few hundred distinct words."""
    rng = np.random.default_rng(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    return [
        LocalData(f"play/ROLE{i}", tuple(
            Example(text=" ".join(rng.choice(words, size=rng.integers(6, 14))).capitalize()
                    + ".") for _ in range(speeches)), ())
        for i in range(n)
    ]


CLIENTS = _clients()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model([t for c in CLIENTS for t in c.train_texts],
                      tmp_path_factory.mktemp("audit") / "tiny")


@pytest.fixture(scope="module")
def scenario(model_dir: Path) -> Scenario:
    return Scenario(model_dir, lora=LoraSection(), learning_rate=1e-3, seq_len=SEQ_LEN,
                    safeguards=Safeguards(cohort=COHORT), threads=THREADS)


VICTIMS = range(6)  # each a seed and a client; CLIENTS[v + 6] serves as v's decoy


def _public_tokens(scenario: Scenario, victim: int) -> np.ndarray:
    """Token ids of every other client's text: what the attacker may know beforehand."""
    tokenizer = scenario.trainer(False)[0].tokenizer
    return np.concatenate([tokenizer(t, add_special_tokens=False)["input_ids"]
                           for i, c in enumerate(CLIENTS) if i != victim for t in c.train_texts])


def _bag_recalls(scenario: Scenario, victim: int, *, protected: bool) -> tuple[float, float]:
    """The bag-of-tokens attack's recall on ``victim``'s update, and the frequency prior's."""
    obs = scenario.observe(CLIENTS[victim], CLIENTS[victim + 1:], batch_size=1, local_steps=1,
                           protected=protected, seed=victim)
    basis = TokenBasis.from_output_head(
        obs.model.get_output_embeddings().weight.detach().numpy())
    scores = bag_of_tokens_scores(obs.update, residual_writer_keys(list(obs.update),
                                                                   last_layers=3), basis)
    k = len(metrics.distinct(obs.truth))
    prior = metrics.frequency_guess(_public_tokens(scenario, victim), k)
    return (metrics.bag_recall(top_k(scores, k), obs.truth),
            metrics.bag_recall(prior, obs.truth))


@pytest.mark.measured
def test_bag_of_tokens_leaks_without_safeguards_and_not_with_them(scenario: Scenario) -> None:
    """The baseline is the attacker who ignores the update and guesses the corpus's most
    frequent tokens (uniform chance, ~0.03 here, is far weaker than that on real text)."""
    off = np.array([_bag_recalls(scenario, v, protected=False) for v in VICTIMS])
    on = np.array([_bag_recalls(scenario, v, protected=True) for v in VICTIMS])
    prior = float(off[:, 1].mean())
    # Unprotected, batch 1, one step. Measured over these six victims on an AMD EPYC
    # (OPENBLAS_CORETYPE Haswell/auto/Prescott, 1 and 2 threads): recall 0.75-0.88 per
    # victim, mean ~0.8, against a frequency prior of ~0.15.
    within("unprotected recall - frequency prior (mean of 6)", off[:, 0].mean() - prior,
           above=0.3)
    # Clipped to C=1, noise std 1 per coordinate on the sum, 6 clients summed: the scores
    # are those of a random subspace (measured ~0.04, 0-2 hits of ~15 per victim), so the
    # attack does worse than the frequency prior.
    within("protected recall - frequency prior (mean of 6)", on[:, 0].mean() - prior,
           below=0.0)


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.measured
def test_attack_objective_is_lowest_at_the_true_text(scenario: Scenario, steps: int) -> None:
    """The attacker's model of the client's AdamW update (same trainer maths, smoothed
    sign of one gradient) must single out the true text: its shuffles score worse."""
    obs = scenario.observe(CLIENTS[0], [], batch_size=2, local_steps=steps, protected=False,
                           seed=0)
    settings = OptimizationSettings()
    rng = np.random.default_rng(0)

    def distance(tokens: np.ndarray) -> float:
        return matching_distance(obs.model, obs.global_adapter, obs.update, tokens, settings)

    at_truth = distance(obs.truth)
    shuffled = [distance(np.stack([rng.permutation(row) for row in obs.truth]))
                for _ in range(5)]
    # As a ratio, so that the bound does not depend on the distance's scale.
    within("nearest shuffle / truth distance", min(shuffled) / at_truth, above=1.0)


def _optimization_recall(scenario: Scenario, victim: int, observed: int) -> float:
    """Recall on ``victim``'s batch of the attack run on client ``observed``'s update."""
    truth = scenario.observe(CLIENTS[victim], [], batch_size=1, local_steps=1, protected=False,
                             seed=victim).truth
    obs = scenario.observe(CLIENTS[observed], [], batch_size=1, local_steps=1,
                           protected=False, seed=victim)
    basis = TokenBasis.from_output_head(
        obs.model.get_output_embeddings().weight.detach().numpy())
    scores = bag_of_tokens_scores(obs.update, residual_writer_keys(list(obs.update)), basis)
    guess = optimization_attack(obs.model, obs.global_adapter, obs.update, batch_size=1,
                                seq_len=SEQ_LEN, prior=scores,
                                settings=OptimizationSettings(iterations=8), seed=victim)
    assert guess.shape == (1, SEQ_LEN)
    return metrics.bag_recall(guess, truth)


@pytest.mark.measured
def test_optimization_attack_beats_the_frequency_prior_and_a_decoy(scenario: Scenario) -> None:
    """Two baselines measured in the same run: the frequency prior (no update at all) and
    a decoy (the same attack on another client's update, scored on the victim's text)."""
    attack, decoy, prior = [], [], []
    for victim in VICTIMS:
        attack.append(_optimization_recall(scenario, victim, victim))
        decoy.append(_optimization_recall(scenario, victim, victim + 6))
        truth = scenario.observe(CLIENTS[victim], [], batch_size=1, local_steps=1,
                                 protected=False, seed=victim).truth
        prior.append(metrics.bag_recall(
            metrics.frequency_guess(_public_tokens(scenario, victim), SEQ_LEN), truth))
    baseline = max(float(np.mean(decoy)), float(np.mean(prior)))
    # Measured over these six victims on an AMD EPYC under the four kernel set-ups of
    # tests/cpu_matrix.py: attack 0.25-0.44 per victim (mean 0.35-0.38), frequency prior mean
    # 0.15, decoy mean 0.03, so the gap was 0.20-0.24; the attack beat both baselines on 5 or
    # 6 of the 6 victims. (The old bound was one victim's recall > 0.25: exactly 0.25 on
    # that machine, ~0.5 on the one where the bound had been set.)
    within("attack - best baseline (mean of 6)", float(np.mean(attack)) - baseline, above=0.1)
    wins = sum(a > max(d, p) for a, d, p in zip(attack, decoy, prior, strict=True))
    within("victims on which the attack beats both baselines", wins, above=2)  # half or more


def test_client_gets_exactly_batch_blocks(scenario: Scenario) -> None:
    tokenizer = scenario.trainer(False)[0].tokenizer
    texts = exact_blocks(tokenizer, CLIENTS[0].train_texts, batch_size=3, seq_len=SEQ_LEN,
                         client_id="x")
    assert token_blocks(tokenizer, texts, SEQ_LEN).shape == (3, SEQ_LEN)
    with pytest.raises(AuditError, match="do not make 1000 blocks"):
        exact_blocks(tokenizer, CLIENTS[0].train_texts, batch_size=1000, seq_len=SEQ_LEN,
                     client_id="x")


def test_secure_sum_reveals_the_sum() -> None:
    rng = np.random.default_rng(1)
    updates = [{"a": rng.normal(0, 0.3, (4, 3)).astype(np.float32),
                "b": rng.normal(0, 0.3, (5,)).astype(np.float32)} for _ in range(4)]
    total = secure_sum(updates, bound=2.0)
    for key in ("a", "b"):
        np.testing.assert_allclose(total[key], sum(u[key] for u in updates), atol=1e-6)


def test_metrics_match_sequences_before_scoring() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert metrics.token_recovery(truth[::-1], truth) == 1.0
    assert metrics.token_recovery(np.array([[5, 6, 0, 0], [0, 0, 0, 4]]), truth) == 0.375
    assert metrics.bag_recall(np.array([1, 9, 8]), truth) == 0.25
    assert metrics.bag_chance(truth, 80) == 0.1
    with pytest.raises(ValueError, match=r"must both be \(B, S\)"):
        metrics.token_recovery(truth[:1], truth)


def test_residual_writer_keys_pick_the_last_layers() -> None:
    keys = [f"base_model.model.model.layers.{i}.{m}.lora_{f}.weight"
            for i in range(3) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
            for f in "AB"]
    got = residual_writer_keys(keys, last_layers=1)
    assert got == ["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight",
                   "base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight"]
    with pytest.raises(ValueError, match="o_proj or down_proj"):
        residual_writer_keys([k for k in keys if "q_proj" in k])


def test_main_writes_json_table_and_plot(tmp_path: Path, model_dir: Path) -> None:
    """``--data``: a folder with one JSONL file per client, one device per file."""
    data = tmp_path / "clients"
    data.mkdir()
    for i, c in enumerate(CLIENTS):
        (data / f"client{i:02d}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in c.train_texts))
    out = tmp_path / "out"
    rc = main(["--model", str(model_dir), "--data", str(data), "--cache-dir",
               str(tmp_path / "cache"), "--batch-sizes", "1,2", "--local-steps", "1,2",
               "--opt-iters", "2", "--cohort", "3", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "audit.json").read_text())
    assert doc["format"] == "fedtune-audit/2"
    assert len(doc["measurements"]) == 2 * 2 * 2 * 3  # batch x steps x safeguards x attacks
    assert {r["attack"] for r in doc["summary"]} == {"bag", "opt", "mia"}
    for row in doc["measurements"]:  # every figure beside the baselines of the same run
        if row["attack"] == "bag":
            assert row["recall_prior"] is not None and row["recall_decoy"] is not None
        elif row["attack"] == "opt":
            assert None not in (row["recovery"], row["recovery_prior"], row["recovery_decoy"],
                                row["recall_prior"], row["recall_decoy"])
        else:
            assert 0 <= row["auc"] <= 1 and 0 <= row["tpr_at_1pct_fpr"] <= 1
            assert 0 <= row["auc_other_devices"] <= 1
            assert row["members"] == row["batch_size"] and 0 < row["non_members"] <= 128
    assert doc["settings"]["safeguards"]["cohort"] == 3
    assert doc["settings"]["data"]["source"] == str(data)
    devices = Path(doc["settings"]["devices_dir"])
    assert devices.parent == tmp_path / "cache" / "devices"
    assert len(list(devices.glob("0*/train.jsonl"))) == len(CLIENTS)
    table = (out / "audit.md").read_text()
    assert "| bag-of-tokens (analytic) | 1 | 1 | off |" in table
    assert "| membership inference | batch | local steps | safeguards | members " in table
    assert (out / "audit.png").stat().st_size > 0


def test_data_option_replaces_the_configs_source(tmp_path: Path) -> None:
    from simulations.audit.cli_args import audit_data

    parser = build_parser()
    assert audit_data(parser.parse_args([])) == DataSection()
    folder = tmp_path / "texts"
    got = audit_data(parser.parse_args(["--data", str(folder)]))
    assert (got.source, got.partition, got.partition_by) == (str(folder), "natural", "file")
    config = tmp_path / "run.toml"
    config.write_text('[data]\nsource = "elsewhere"\npartition = "iid"\nnum_devices = 3\n'
                      'min_examples = 2\n')
    got = audit_data(parser.parse_args(["--data", str(folder), "--config", str(config)]))
    assert (got.partition, got.partition_by, got.num_devices, got.min_examples) == (
        "iid", "", 3, 2), "the config's partitioning applies"
    assert audit_data(parser.parse_args(["--data", "chatterbot"])).partition_by == ""


def test_main_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--batch-sizes", "0,4"])
    assert exit_.value.code == 2
    assert "expected integers >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--noise-multiplier", "-1", "--model", "tiny"])
    assert exit_.value.code == 2
    assert "noise_multiplier must be >= 0" in capsys.readouterr().err


def test_membership_scores_golden_values() -> None:
    from simulations.audit.membership import roc_auc, tpr_at_fpr

    members = np.array([0.1, 0.5, 0.9])
    non = np.array([0.2, 0.5, 0.6, 0.7])
    # member < non-member pairs: 0.1 beats 4, 0.5 beats 2 and ties 1, 0.9 beats none
    assert roc_auc(members, non) == pytest.approx((4 + 2 + 0.5 + 0) / 12)
    assert roc_auc(np.array([0.0]), non) == 1.0 and roc_auc(np.array([1.0]), non) == 0.0
    many = np.linspace(1.0, 2.0, 200)  # 1 % of 200 = 2 non-members may be flagged
    assert tpr_at_fpr(np.array([0.5, 1.004, 1.02, 3.0]), many) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="non-members"):
        roc_auc(members, np.array([]))


@pytest.mark.measured
def test_membership_inference_exposes_a_raw_update_and_not_the_protected_mean(
        scenario: Scenario) -> None:
    """Loss ratio on the adapter the coordinator ends up with, over three victims: with
    safeguards off (the target's own adapter) its training blocks stand out from the
    target's own blocks it did not train on; with them on (the noised secure mean) they do
    not. (4 members: a guess's AUC has std ~0.14 per victim, ~0.08 averaged.)"""
    from simulations.audit.run import Outsiders, _membership

    tokenizer = scenario.trainer(False)[0].tokenizer
    outsiders = Outsiders.build(CLIENTS, CLIENTS[:COHORT + 1], tokenizer=tokenizer, seed=0,
                                seq_len=SEQ_LEN, blocks=128)
    aucs: dict[bool, list[float]] = {False: [], True: []}
    for victim in range(3):
        cohort = [c for i, c in enumerate(CLIENTS[:COHORT]) if i != victim]
        for protected in (False, True):
            obs = scenario.observe(CLIENTS[victim], cohort, batch_size=4, local_steps=1,
                                   protected=protected, seed=victim)
            unused = outsiders.unused_blocks(CLIENTS[victim], 4, 128)
            result = _membership(obs, unused, outsiders.blocks, seed=victim, client="target")
            assert result.auc is not None
            aucs[protected].append(result.auc)
    within("membership AUC, safeguards off", float(np.mean(aucs[False])), above=0.9)
    within("membership AUC, safeguards on", float(np.mean(aucs[True])), below=0.8)
