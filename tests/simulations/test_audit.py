"""The leakage audit: its attacks leak without safeguards and fall to chance with them.

Everything runs on a tiny random-init Llama (built from the synthetic texts below) through
the real client trainer, clipping and secure-aggregation code, with a reduced grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.local_data import LocalTextData
from kernels.causal_lm_data import token_blocks
from protocols.run_config import LoraSection
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
from simulations.audit.run import main
from simulations.audit.scenario import AuditError, Safeguards, Scenario, exact_blocks, secure_sum

torch.set_num_threads(1)

COHORT = 6
SEQ_LEN = 16


def _clients(n: int = 12, speeches: int = 30) -> list[LocalTextData]:
    """``n`` clients speaking a seeded pseudo-language with a few hundred distinct words."""
    rng = np.random.default_rng(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    return [
        LocalTextData(f"play/ROLE{i}", tuple(
            " ".join(rng.choice(words, size=rng.integers(6, 14))).capitalize() + "."
            for _ in range(speeches)), ())
        for i in range(n)
    ]


CLIENTS = _clients()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model([t for c in CLIENTS for t in c.train],
                      tmp_path_factory.mktemp("audit") / "tiny")


@pytest.fixture(scope="module")
def scenario(model_dir: Path) -> Scenario:
    return Scenario(model_dir, lora=LoraSection(), learning_rate=1e-3, seq_len=SEQ_LEN,
                    safeguards=Safeguards(cohort=COHORT))


def _bag_recall(scenario: Scenario, seed: int, *, protected: bool) -> tuple[float, float]:
    obs = scenario.observe(CLIENTS[seed], CLIENTS[seed + 1:], batch_size=1, local_steps=1,
                           protected=protected, seed=seed)
    basis = TokenBasis.from_output_head(
        obs.model.get_output_embeddings().weight.detach().numpy())
    scores = bag_of_tokens_scores(obs.update, residual_writer_keys(list(obs.update),
                                                                   last_layers=3), basis)
    bag = top_k(scores, len(metrics.distinct(obs.truth)))
    return metrics.bag_recall(bag, obs.truth), metrics.bag_chance(obs.truth, basis.vocab_size)


def test_bag_of_tokens_leaks_without_safeguards_and_not_with_them(scenario: Scenario) -> None:
    seeds = range(6)
    off = [_bag_recall(scenario, s, protected=False) for s in seeds]
    on = [_bag_recall(scenario, s, protected=True) for s in seeds]
    chance = float(np.mean([c for _, c in off]))  # K/V: ~14 of 512 tokens, ~0.03
    off_recall = float(np.mean([r for r, _ in off]))
    on_recall = float(np.mean([r for r, _ in on]))
    # Unprotected, batch 1, one step: measured 0.75-0.88 per seed, ~25x chance.
    assert off_recall > 0.4 and off_recall > 10 * chance, (off_recall, chance)
    # Clipped to C=1, noise std 1 per coordinate on the sum, 6 clients summed: the score is
    # that of a random subspace, so recall averages K/V (measured 1.3x chance over these six
    # seeds: 0, 1 or 2 hits of ~15); the band allows 3x chance.
    assert on_recall < 3 * chance, (on_recall, chance)


@pytest.mark.parametrize("steps", [1, 5])
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
                for _ in range(3)]
    assert at_truth < min(shuffled), (at_truth, shuffled)


def test_optimization_attack_recovers_tokens_without_safeguards(scenario: Scenario) -> None:
    obs = scenario.observe(CLIENTS[0], [], batch_size=1, local_steps=1, protected=False, seed=0)
    basis = TokenBasis.from_output_head(
        obs.model.get_output_embeddings().weight.detach().numpy())
    scores = bag_of_tokens_scores(obs.update, residual_writer_keys(list(obs.update)), basis)
    guess = optimization_attack(obs.model, obs.global_adapter, obs.update, batch_size=1,
                                seq_len=SEQ_LEN, prior=scores,
                                settings=OptimizationSettings(iterations=8), seed=0)
    assert guess.shape == (1, SEQ_LEN)
    # The reconstruction's tokens come from the batch far more often than 16 uniform
    # guesses would (~3 % of the batch's tokens); measured ~0.5.
    assert metrics.bag_recall(guess, obs.truth) > 0.25


def test_client_gets_exactly_batch_blocks(scenario: Scenario) -> None:
    tokenizer = scenario.trainer(False)[0].tokenizer
    texts = exact_blocks(tokenizer, CLIENTS[0].train, batch_size=3, seq_len=SEQ_LEN,
                         client_id="x")
    assert token_blocks(tokenizer, texts, SEQ_LEN).shape == (3, SEQ_LEN)
    with pytest.raises(AuditError, match="do not make 1000 blocks"):
        exact_blocks(tokenizer, CLIENTS[0].train, batch_size=1000, seq_len=SEQ_LEN,
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
    partitions = tmp_path / "clients.json"
    partitions.write_text(json.dumps({"format": "fedtune-partitions/1", "clients": [
        {"client_id": c.client_id, "train": list(c.train), "heldout": []} for c in CLIENTS]}))
    out = tmp_path / "out"
    rc = main(["--model", str(model_dir), "--partitions-file", str(partitions), "--cache-dir",
               str(tmp_path / "cache"), "--batch-sizes", "1,2", "--local-steps", "1,2",
               "--opt-iters", "2", "--cohort", "3", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "audit.json").read_text())
    assert doc["format"] == "fedtune-audit/1"
    assert len(doc["measurements"]) == 2 * 2 * 2 * 2  # batch x steps x safeguards x attacks
    assert {r["attack"] for r in doc["summary"]} == {"bag", "opt"}
    assert doc["settings"]["safeguards"]["cohort"] == 3
    table = (out / "audit.md").read_text()
    assert "| bag-of-tokens (analytic) | 1 | 1 | off |" in table
    assert (out / "audit.png").stat().st_size > 0


def test_main_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--batch-sizes", "0,4"])
    assert exit_.value.code == 2
    assert "expected integers >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--noise-multiplier", "-1", "--model", "tiny"])
    assert exit_.value.code == 2
    assert "noise_multiplier must be >= 0" in capsys.readouterr().err
