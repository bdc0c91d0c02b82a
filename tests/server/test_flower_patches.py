"""The coordinator's patches of Flower internals (server/flower_patches.py): each still fits
the installed Flower, is in force inside its scope, and Flower's original is back after it.
"""

from __future__ import annotations

import inspect
import random
from pathlib import Path
from typing import Any

import pytest
from flwr.serverapp.strategy import strategy_utils

from protocols.run_config import RunConfig
from server.flower_patches import SAMPLER_ATTR, flower_samples_with

REVISIT = "Flower changed: revisit server/flower_patches.py:flower_samples_with"


class FixedGrid:
    def get_node_ids(self) -> list[int]:
        return list(range(10))


class Recording(random.Random):
    def __init__(self) -> None:
        super().__init__(0)
        self.calls: list[tuple[list[int], int]] = []

    def sample(self, population: Any, k: int, **kwargs: Any) -> list[Any]:
        self.calls.append((list(population), k))
        return super().sample(population, k, **kwargs)


class Boom(Exception):
    pass


# --- guard: what the patch replaces is still there ---------------------------------------------


def test_flower_samples_with_the_name_we_replace() -> None:
    assert getattr(strategy_utils, SAMPLER_ATTR, None) is random, REVISIT
    params = list(inspect.signature(strategy_utils.sample_nodes).parameters)
    assert params == ["grid", "min_available_nodes", "sample_size"], REVISIT
    assert "random.sample(all_nodes, sample_size)" in inspect.getsource(
        strategy_utils.sample_nodes), REVISIT
    assert inspect.getsource(strategy_utils).count("random.") == 1, (
        f"{REVISIT}: Flower draws from `random` elsewhere too")


# --- in force inside the scope, gone after it -------------------------------------------------


def test_inside_the_scope_flower_samples_with_ours_and_after_it_with_its_own() -> None:
    original = getattr(strategy_utils, SAMPLER_ATTR)
    sampler = Recording()
    with flower_samples_with(sampler) as installed:
        assert installed is sampler
        assert getattr(strategy_utils, SAMPLER_ATTR) is sampler
        sampled, everyone = strategy_utils.sample_nodes(FixedGrid(), 2, 3)  # type: ignore[arg-type]
        assert sampler.calls == [(everyone, 3)] and len(sampled) == 3
    assert getattr(strategy_utils, SAMPLER_ATTR) is original


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_the_original_is_back_when_the_scope_raised(error: type[BaseException]) -> None:
    original = getattr(strategy_utils, SAMPLER_ATTR)
    with pytest.raises(error), flower_samples_with(random.Random(1)):
        raise error()
    assert getattr(strategy_utils, SAMPLER_ATTR) is original


def test_nested_scopes_restore_in_order() -> None:
    original = getattr(strategy_utils, SAMPLER_ATTR)
    outer, inner = random.Random(1), random.Random(2)
    with flower_samples_with(outer):
        with flower_samples_with(inner):
            assert getattr(strategy_utils, SAMPLER_ATTR) is inner
        assert getattr(strategy_utils, SAMPLER_ATTR) is outer
    assert getattr(strategy_utils, SAMPLER_ATTR) is original


# --- the call site: run_coordinator scopes it to its rounds -----------------------------------


class SamplerSpy:
    """A grid whose first exchange records the sampler in force, then fails the run."""

    def __init__(self) -> None:
        self.seen: object = None

    def get_node_ids(self) -> list[int]:
        return [101, 202, 303, 404]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        self.seen = getattr(strategy_utils, SAMPLER_ATTR)
        raise Boom("the network went away")


@pytest.mark.parametrize("client_dp", [False, True], ids=["seeded", "secret"])
def test_run_coordinator_samples_with_ours_during_its_rounds_only(
    tiny_model_dir: Path, mini_cache: Path, tmp_path: Path, client_dp: bool
) -> None:
    from server.app import run_coordinator
    from simulations.flower_patches import task_identity
    from simulations.runner import check_inputs, flower_run_config

    config = RunConfig.from_nested({
        "model": {"source": str(tiny_model_dir)},
        "data": {"min_examples": 5, "heldout_fraction": 0.25},
        "lora": {"r": 4},
        "train": {"rounds": 2, "clients_per_round": 3, "local_steps": 1, "batch_size": 2,
                  "seq_len": 16, "learning_rate": 0.01},
        "eval": {"max_blocks": 2, "batch_size": 2},
        "privacy": {"client_dp": client_dp, "clip_norm": 0.05, "noise_multiplier": 0.5},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    flat = flower_run_config(check_inputs(config, mini_cache), run_dir)
    grid = SamplerSpy()
    original = getattr(strategy_utils, SAMPLER_ATTR)

    with task_identity(), pytest.raises(Boom):
        run_coordinator(grid, flat)  # type: ignore[arg-type]

    assert isinstance(grid.seen, random.Random) and grid.seen is not original
    assert isinstance(grid.seen, random.SystemRandom) is client_dp
    assert getattr(strategy_utils, SAMPLER_ATTR) is original
