"""The forward-only (MeZO) edge trainer: exact replay by the coordinator, it learns, no torch.

Most tests run on a numpy stand-in for :class:`kernels.edge_runtime.EdgeModel` (a quadratic
loss): they check the protocol arithmetic in milliseconds. The last ones run a real ONNX
export of the tiny Llama from ``tests/conftest.py``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.edge_trainer import EdgeMeZOTrainer, MeZOSettings
from client.local_data import LocalData
from client.trainer import TrainInstruction
from protocols.adapter_spec import AdapterSpec, TensorSpec
from protocols.codecs import ClientUpdate, RoundContext, get_codec, record_nbytes
from protocols.errors import InvalidUpdate
from protocols.run_config import LoraSection
from protocols.seed_updates import apply_seed_updates, perturbation
from protocols.validation import validate_update
from tests.measured import within

REPO = Path(__file__).resolve().parents[2]
A = "base_model.model.layers.0.q_proj.lora_A.weight"
B = "base_model.model.layers.0.q_proj.lora_B.weight"


class CharTokenizer:
    """``tokenizers.Tokenizer.encode_batch`` on characters: id = code point % 50."""

    class Encoding:
        def __init__(self, text: str) -> None:
            self.ids = [ord(c) % 50 for c in text]
            self.offsets = [(i, i + 1) for i in range(len(text))]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False
                     ) -> list[Encoding]:
        return [self.Encoding(t) for t in texts]


class QuadraticModel:
    """EdgeModel's interface with loss = mean((B·A − T)²) + a batch-dependent offset."""

    float_activations = True
    eos_token_id = 0

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.adapter_shapes = {A: (2, 6), B: (5, 2)}
        self.target = rng.standard_normal((5, 6)).astype(np.float32)
        self.calls = 0
        self.tokenizer = CharTokenizer()
        self.export_dir = Path(tempfile.mkdtemp(prefix="quadratic-export-"))
        (self.export_dir / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')

    def token_nll(self, input_ids: np.ndarray, adapter: Mapping[str, Any]) -> np.ndarray:
        self.calls += 1
        err = float(np.mean((np.asarray(adapter[B]) @ np.asarray(adapter[A]) - self.target) ** 2))
        offset = input_ids[:, 1:].astype(np.float32) / 1000.0
        return (err + offset).astype(np.float32)

    def mean_loss(self, input_ids: np.ndarray, adapter: Mapping[str, Any], *,
                  scored: np.ndarray | None = None) -> float:
        return float(self.token_nll(input_ids, adapter).mean(dtype=np.float64))


DATA = LocalData("c1", train=("x" * 400,), heldout=("y" * 80,))


def _instruction(steps: int = 12, *, lr: float = 0.05, seed: int = 3,
                 server_round: int = 2, subspace: str = "full",
                 last_step: Mapping[str, np.ndarray] | None = None) -> TrainInstruction:
    if subspace == "trajectory" and last_step is None:
        last_step = {B: _toward_target(_start(True))}
    return TrainInstruction(server_round=server_round, local_steps=steps, batch_size=4,
                            learning_rate=lr, seq_len=8, seed=seed, subspace=subspace,
                            last_step=last_step)


def _toward_target(start: Mapping[str, np.ndarray]) -> np.ndarray:
    """A fifth of the way from B to the least-squares B for QuadraticModel's target: a
    "last step" that went the right way but not far enough."""
    best = QuadraticModel().target @ np.linalg.pinv(start[A])
    return (0.2 * (best - start[B])).astype(np.float32)


def _start(freeze_a: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {A: rng.standard_normal((2, 6)).astype(np.float32),
            B: (0.1 * rng.standard_normal((5, 2))).astype(np.float32)}


def _spec(freeze_a: bool) -> AdapterSpec:
    return AdapterSpec(tensors={A: TensorSpec((2, 6), trainable=not freeze_a),
                                B: TensorSpec((5, 2))})


@pytest.mark.parametrize("freeze_a", [True, False])
def test_coordinator_replay_is_bit_identical_to_the_client(freeze_a: bool) -> None:
    trainer = EdgeMeZOTrainer(QuadraticModel(), LoraSection(r=2, freeze_a=freeze_a))  # type: ignore[arg-type]
    start, instruction = _start(freeze_a), _instruction()
    outcome = trainer.train(start, DATA, instruction)
    update = outcome.seed_update
    assert update is not None and update.base_round == instruction.server_round
    assert len(update.seeds) == instruction.local_steps == len(set(update.seeds.tolist()))
    replay = apply_seed_updates(start, update.pairs(), spec=_spec(freeze_a),
                                learning_rate=instruction.learning_rate)
    assert set(outcome.tensors) == set(_spec(freeze_a).trainable_keys)
    for key, value in outcome.tensors.items():
        assert value.tobytes() == replay[key].tobytes(), key
    # ...and through the wire: the device sends its steps, the coordinator replays them
    # with the round's context and gets the device's delta, bit for bit.
    delta = {k: v - start[k] for k, v in outcome.tensors.items()}
    record = get_codec("seed-scalar").encode(ClientUpdate(delta, update),
                                            RoundContext(start, instruction.server_round))
    ctx = RoundContext(global_adapter=start, spec=_spec(freeze_a),
                       server_round=instruction.server_round,
                       learning_rate=instruction.learning_rate,
                       max_steps=instruction.local_steps,
                       max_abs_scalar=trainer.settings.max_abs_scalar)
    decoded = get_codec("seed-scalar").decode(record, ctx)
    for key, value in delta.items():
        assert value.tobytes() == decoded[key].tobytes(), key
    assert record_nbytes(record) <= 1024
    # The dense alternative: the same delta through the ordinary fp32 codec.
    dense = get_codec("fp32").decode(get_codec("fp32").encode(ClientUpdate(delta), ctx), ctx)
    validate_update(dense, _spec(freeze_a))
    assert all(dense[k].tobytes() == decoded[k].tobytes() for k in dense)


def test_components_steps_replay_exactly_and_rescale_the_global_components() -> None:
    """edge.subspace = 'components': each step rescales the round's B columns; the device's
    seeds and scalars replay to its adapter bit for bit, under the 'components' layout."""
    trainer = EdgeMeZOTrainer(QuadraticModel(), LoraSection(r=2))  # type: ignore[arg-type]
    start, instruction = _start(True), _instruction(lr=0.5, subspace="components")
    outcome = trainer.train(start, DATA, instruction)
    update = outcome.seed_update
    assert update is not None and np.abs(update.scalars).max() > 0
    ctx = RoundContext(global_adapter=start, spec=_spec(True), server_round=2,
                       learning_rate=0.5, max_steps=12, subspace="components")
    record = get_codec("seed-scalar").encode(ClientUpdate({}, update), ctx)
    decoded = get_codec("seed-scalar").decode(record, ctx)
    assert decoded[B].tobytes() == (outcome.tensors[B] - start[B]).tobytes()
    # Every column of B is the round's column times one factor: a rescaled component.
    factor = outcome.tensors[B] / start[B]
    np.testing.assert_allclose(factor, factor[:1].repeat(5, 0), rtol=1e-5)
    assert not np.allclose(factor, 1.0)
    with pytest.raises(InvalidUpdate, match=r"edge\.subspace"):  # a 'full' coordinator refuses
        get_codec("seed-scalar").decode(record, replace(ctx, subspace="full"))


def test_trajectory_steps_search_along_the_last_step_and_replay_exactly() -> None:
    """edge.subspace = 'trajectory': every step moves along the coordinator's last step Δ,
    so the update is s·Δ; along a step that went the right way but not far enough the
    device goes further (s > 0) and its loss falls; the replay against the same Δ is the
    device's adapter bit for bit, a coordinator in another subspace refuses it, and the
    same seeds replayed along another Δ give another adapter (Δ is part of the round)."""
    model = QuadraticModel()
    trainer = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    start, instruction = _start(True), _instruction(lr=20.0, subspace="trajectory")
    assert instruction.last_step is not None
    step = instruction.last_step[B]
    outcome = trainer.train(start, DATA, instruction)
    update = outcome.seed_update
    assert update is not None and np.abs(update.scalars).max() > 0
    moved = outcome.tensors[B] - start[B]
    s = float(np.sum(moved * step) / np.sum(step * step))
    np.testing.assert_allclose(moved, s * step, rtol=1e-4, atol=1e-6)  # only along Δ
    assert s > 0.5
    held = trainer.blocks.get(DATA, "heldout", 8)
    assert (model.mean_loss(held.ids, {**start, **outcome.tensors})
            < model.mean_loss(held.ids, start) - 0.01)
    ctx = RoundContext(global_adapter=start, spec=_spec(True), server_round=2,
                       learning_rate=20.0, max_steps=12, subspace="trajectory",
                       last_step=instruction.last_step)
    record = get_codec("seed-scalar").encode(ClientUpdate({}, update), ctx)
    decoded = get_codec("seed-scalar").decode(record, ctx)
    assert decoded[B].tobytes() == moved.tobytes()
    with pytest.raises(InvalidUpdate, match=r"edge\.subspace"):
        get_codec("seed-scalar").decode(record, replace(ctx, subspace="components"))
    other = get_codec("seed-scalar").decode(record, replace(ctx, last_step={B: -step}))
    np.testing.assert_allclose(other[B], -moved, rtol=1e-6, atol=1e-7)


def test_trajectory_without_a_last_step_moves_nothing_or_is_refused() -> None:
    """A run's first round has no last step yet (zeros): no step moves, one pass a step.
    An instruction without Δ, or with Δ of the wrong shape, is refused with the reason."""
    model = QuadraticModel()
    trainer = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    zero = _instruction(subspace="trajectory", last_step={B: np.zeros((5, 2), np.float32)})
    outcome = trainer.train(_start(True), DATA, zero)
    assert outcome.tensors[B].tobytes() == _start(True)[B].tobytes() and model.calls == 12
    with pytest.raises(ValueError, match="last step"):
        TrainInstruction(server_round=1, local_steps=1, batch_size=1, learning_rate=1.0,
                         seq_len=8, seed=0, subspace="trajectory")
    with pytest.raises(ValueError, match=r"last step `.*lora_B.*`: expected float32 \(5, 2\)"):
        trainer.train(_start(True), DATA, _instruction(
            subspace="trajectory", last_step={B: np.zeros((2, 5), np.float32)}))


def test_components_of_a_zero_b_train_nothing_in_one_pass_a_step() -> None:
    """Before any backprop round B = 0 spans no direction: no step moves, and the device
    spends one forward pass a step (for its reported loss), not two."""
    model = QuadraticModel()
    trainer = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    start = {**_start(True), B: np.zeros((5, 2), np.float32)}
    outcome = trainer.train(start, DATA, _instruction(subspace="components"))
    assert not outcome.tensors[B].any() and model.calls == 12
    assert outcome.seed_update is not None and not outcome.seed_update.scalars.any()


def test_perturbing_theta_in_place_would_drift() -> None:
    # Why the trainer keeps θ clean (client/edge_trainer.py): θ + εz − εz is not θ in float32.
    theta = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    z = perturbation(9, {"w": (10_000,)})["w"]
    eps = np.float32(1e-3)
    round_trip = (theta + eps * z) - eps * z
    assert not np.array_equal(round_trip, theta)


def test_frozen_tensors_and_the_callers_adapter_are_untouched() -> None:
    trainer = EdgeMeZOTrainer(QuadraticModel(), LoraSection(r=2, freeze_a=True))  # type: ignore[arg-type]
    start = _start(True)
    before = {k: v.copy() for k, v in start.items()}
    outcome = trainer.train(start, DATA, _instruction(steps=4))
    assert set(outcome.tensors) == {B}
    for key in start:
        assert start[key].tobytes() == before[key].tobytes()


@pytest.mark.measured
def test_mezo_lowers_a_quadratic_loss_and_reports_metrics() -> None:
    model = QuadraticModel()
    trainer = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    start = _start(False)
    before = trainer.evaluate(start, DATA, seq_len=8, batch_size=4).loss
    drops = []
    for seed in (3, 4, 5, 6):
        model.calls = 0
        outcome = trainer.train(start, DATA, _instruction(steps=60, lr=0.1, seed=seed))
        drops.append(before - trainer.evaluate({**start, **outcome.tensors}, DATA, seq_len=8,
                                               batch_size=4).loss)
        assert model.calls >= 2 * 60  # two forward passes a step
    # Seed 3 measured 0.695 -> 0.570 when this was one seed; see the value logged here.
    within("quadratic loss drop, mean of 4 seeds", float(np.mean(drops)), above=0.05)
    assert outcome.num_examples == len(trainer.blocks.get(DATA, "train", 8)) == 50  # 401 chars
    assert set(outcome.metrics) == {"train-loss", "train-seconds"}
    assert outcome.metrics["train-seconds"] > 0


def test_same_round_same_update_other_round_other_seeds() -> None:
    trainer = EdgeMeZOTrainer(QuadraticModel(), LoraSection(r=2))  # type: ignore[arg-type]
    one = trainer.train(_start(False), DATA, _instruction(steps=3)).seed_update
    two = trainer.train(_start(False), DATA, _instruction(steps=3)).seed_update
    later = trainer.train(_start(False), DATA, _instruction(steps=3, server_round=3)).seed_update
    assert one is not None and two is not None and later is not None
    assert one.seeds.tolist() == two.seeds.tolist()
    assert one.scalars.tobytes() == two.scalars.tobytes()
    assert not set(one.seeds.tolist()) & set(later.seeds.tolist())


def test_scalars_are_clipped_to_the_bound() -> None:
    settings = MeZOSettings(epsilon=1e-3, max_abs_scalar=0.01)
    trainer = EdgeMeZOTrainer(QuadraticModel(), LoraSection(r=2), settings=settings)  # type: ignore[arg-type]
    update = trainer.train(_start(False), DATA, _instruction(steps=5)).seed_update
    assert update is not None
    assert np.all(np.abs(update.scalars) <= np.float32(0.01))


def test_non_finite_loss_is_an_error_not_an_upload() -> None:
    model = QuadraticModel()
    model.target[0, 0] = np.nan
    trainer = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite loss at MeZO step 0"):
        trainer.train(_start(False), DATA, _instruction(steps=2))


def test_wrong_adapter_keys_and_empty_data_are_refused() -> None:
    trainer = EdgeMeZOTrainer(QuadraticModel(), LoraSection(r=2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        trainer.train({B: _start(False)[B]}, DATA, _instruction())
    with pytest.raises(ValueError, match="makes no block of 8 tokens"):
        trainer.train(_start(False), LocalData("c2", train=("x",), heldout=()),
                      _instruction())
    with pytest.raises(ValueError, match=r"heldout part \(0 example\(s\)\) makes no block"):
        trainer.evaluate(_start(False), LocalData("c2", train=(), heldout=()),
                         seq_len=8, batch_size=4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epsilon": 0.0}, "epsilon must be finite and > 0"),
    ({"max_abs_scalar": float("nan")}, "max_abs_scalar must be finite and > 0"),
])
def test_settings_are_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MeZOSettings(**kwargs)


def test_edge_trainer_imports_without_torch() -> None:
    script = ("import sys\n"
              "for m in ('torch', 'transformers', 'peft', 'opacus'): sys.modules[m] = None\n"
              "import client.edge_trainer\n")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)


# --- a real ONNX export of the tiny Llama ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    edge_export = pytest.importorskip("kernels.edge_export")
    tiny_model_dir: Path = request.getfixturevalue("tiny_model_dir")  # torch: only if needed
    out = tmp_path_factory.mktemp("tiny-edge")
    edge_export.export_edge(tiny_model_dir, out, LoraSection(r=4, freeze_a=True),
                            quantization="fp32")
    return out


@pytest.mark.measured
def test_mezo_on_a_real_export_lowers_the_loss_and_replays_exactly(tiny_export: Path) -> None:
    from tests.conftest import mini_play

    trainer = EdgeMeZOTrainer.from_export(tiny_export, LoraSection(r=4, freeze_a=True))
    data = LocalData("mini/ALL", train=tuple(mini_play().split("\n\n")), heldout=())
    held = LocalData("mini/ALL", train=(), heldout=data.train)
    start = trainer.model.zero_adapter()
    rng = np.random.default_rng(0)
    for key in start:  # PEFT-like init: A random, B zero
        if ".lora_A." in key:
            start[key] = (0.3 * rng.standard_normal(start[key].shape)).astype(np.float32)
    before = trainer.evaluate(start, held, seq_len=16, batch_size=8).loss
    drops = []
    for seed in (3, 4, 5):
        instruction = TrainInstruction(server_round=1, local_steps=100, batch_size=4,
                                       learning_rate=0.3, seq_len=16, seed=seed)
        outcome = trainer.train(start, data, instruction)
        drops.append(before - trainer.evaluate({**start, **outcome.tensors}, held, seq_len=16,
                                               batch_size=8).loss)
    # A random-init base has near-uniform logits that B alone can only tilt; backprop buys
    # ~0.1 nats in 30 AdamW steps (test_torch_trainer). MeZO, FFA-LoRA r=4, lr 0.3, 100 steps
    # of batch 4, fp32 export: seed 3 measured 5.782 -> 5.749 (lr 0.05: -0.010, lr 1.0:
    # -0.028).
    within("held-out loss drop, mean of 3 seeds", float(np.mean(drops)), above=0.015)
    assert outcome.seed_update is not None
    replay = apply_seed_updates(start, outcome.seed_update.pairs(), spec=trainer.spec,
                                learning_rate=instruction.learning_rate)
    for key, value in outcome.tensors.items():
        assert value.tobytes() == replay[key].tobytes(), key


def test_an_int8_activation_export_is_refused_with_the_fix(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    from kernels import edge_export

    out = edge_export.export_edge(tiny_model_dir, tmp_path / "fast", LoraSection(r=4),
                                  quantization="int8-smooth")
    with pytest.raises(ValueError, match=r"MeZO cannot train on it.*int4-gguf"):
        EdgeMeZOTrainer.from_export(out, LoraSection(r=4))


@pytest.mark.parametrize("subspace", ["full", "components", "trajectory"])
def test_the_held_out_check_sends_the_best_length_and_replays_exactly(subspace: str) -> None:
    """check_blocks: the device scores its update at 1, 1/2, 1/4 and 0 of its length on its
    own held-out blocks and sends the best as scaled scalars; the coordinator's replay of
    them is the adapter the device kept, bit for bit, and never scores worse than sending
    nothing."""
    model = QuadraticModel()
    checked = EdgeMeZOTrainer(model, LoraSection(r=2),  # type: ignore[arg-type]
                              settings=MeZOSettings(check_blocks=2))
    plain = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    start, kept = _start(True), []
    held = checked.blocks.get(DATA, "heldout", 8).take(slice(0, 2))

    def score(adapter: Mapping[str, Any]) -> float:
        return model.mean_loss(held.ids, adapter, scored=held.scored)

    for lr in (0.05, 5.0, 500.0):  # a fair step, then steps that overshoot
        instruction = _instruction(lr=lr, subspace=subspace)
        ours = checked.train(start, DATA, instruction)
        theirs = plain.train(start, DATA, instruction)
        assert ours.seed_update is not None and theirs.seed_update is not None
        ratio = {float(a / b) for a, b in zip(ours.seed_update.scalars,
                                              theirs.seed_update.scalars, strict=True) if b}
        assert len(ratio) <= 1 and ratio <= {1.0, 0.5, 0.25, 0.0}, ratio
        replay = apply_seed_updates(start, ours.seed_update.pairs(), spec=_spec(True),
                                    learning_rate=lr, subspace=subspace,
                                    last_step=instruction.last_step)
        assert replay[B].tobytes() == ours.tensors[B].tobytes()
        assert score({**start, **ours.tensors}) <= score(start)
        kept.append(ratio)
    if subspace == "full":
        assert kept[-1] != {1.0}, "an overshooting update is cut, not sent whole"


def test_the_line_search_scores_each_multiple_on_the_same_own_blocks() -> None:
    """edge.line_search: the device's loss at θ + η·u for each η, forward only, on its
    own held-out blocks; along a fifth of the way to the least-squares B the quadratic
    loss is lowest near η = 5 (the exact minimiser), and η = 0 scores θ itself."""
    model = QuadraticModel()
    trainer = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    start = _start(True)
    step = {B: _toward_target(start)}
    multiples = [0.0, 1.0, 2.5, 5.0, 7.5]
    losses = trainer.score_multiples(start, step, multiples, DATA, seq_len=8, blocks=2)
    held = trainer.blocks.get(DATA, "heldout", 8).take(slice(0, 2))

    def score(adapter: Mapping[str, Any]) -> float:
        return model.mean_loss(held.ids, adapter, scored=held.scored)

    expected = [score({**start, B: start[B] + np.float32(eta) * step[B]}) for eta in multiples]
    assert losses == pytest.approx(expected, rel=1e-6)
    assert losses[0] == pytest.approx(score(start), rel=1e-6)
    assert int(np.argmin(losses)) == 3  # η = 5: the least-squares B
    assert losses[3] < losses[1] < losses[0]
    # a device without held-out blocks scores on its training blocks
    no_held = LocalData("c2", train=("x" * 400,), heldout=())
    assert len(trainer.score_multiples(start, step, [0.0, 1.0], no_held, seq_len=8,
                                       blocks=2)) == 2


def test_a_line_search_step_of_the_wrong_shape_is_refused() -> None:
    trainer = EdgeMeZOTrainer(QuadraticModel(), LoraSection(r=2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"line-search step `.*lora_B.*`: expected shape"):
        trainer.score_multiples(_start(True), {B: np.zeros((4, 2), np.float32)}, [1.0], DATA,
                                seq_len=8, blocks=2)
    with pytest.raises(ValueError, match="got nothing"):
        trainer.score_multiples(_start(True), {}, [1.0], DATA, seq_len=8, blocks=2)


def test_the_line_search_with_momentum_scores_every_pair_eta_major() -> None:
    """edge.line_search_momentum: θ + η·u + μ·m for every (η, μ), η major; μ = 0 scores
    exactly what the plain line search scores."""
    model = QuadraticModel()
    trainer = EdgeMeZOTrainer(model, LoraSection(r=2))  # type: ignore[arg-type]
    start = _start(True)
    step = {B: _toward_target(start)}
    last = {B: (np.float32(0.5) * _toward_target(start)).astype(np.float32)}
    pairs = [(eta, mu) for eta in (1.0, 2.0) for mu in (0.0, 2.0)]
    losses = trainer.score_multiples(start, step, [1.0, 2.0], DATA, seq_len=8, blocks=2,
                                     last_step=last, momenta=[0.0, 2.0])
    held = trainer.blocks.get(DATA, "heldout", 8).take(slice(0, 2))
    expected = [model.mean_loss(held.ids, {**start, B: start[B] + np.float32(eta) * step[B]
                                           + np.float32(mu) * last[B]}, scored=held.scored)
                for eta, mu in pairs]
    assert losses == pytest.approx(expected, rel=1e-6)
    plain = trainer.score_multiples(start, step, [1.0, 2.0], DATA, seq_len=8, blocks=2)
    assert [losses[0], losses[2]] == pytest.approx(plain, rel=1e-6)
    # (2, 2) is 3 x the step toward the least-squares B, (1, 0) is 1 x: closer is lower
    assert losses[3] < losses[0]
    with pytest.raises(ValueError, match="need the last step"):
        trainer.score_multiples(start, step, [1.0], DATA, seq_len=8, blocks=2, momenta=[0.5])
    with pytest.raises(ValueError, match=r"line-search last step `.*`: expected shape"):
        trainer.score_multiples(start, step, [1.0], DATA, seq_len=8, blocks=2,
                                last_step={B: np.zeros((4, 2), np.float32)}, momenta=[0.5])
