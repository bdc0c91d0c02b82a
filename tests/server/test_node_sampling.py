"""fedtune's node sampler behind Flower's ``sample_nodes`` (see server/node_sampling.py; the
patch itself and its guard: server/flower_patches.py, tests/server/test_flower_patches.py)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from flwr.serverapp.strategy import strategy_utils

from server.flower_patches import SAMPLER_ATTR, flower_samples_with
from server.node_sampling import node_sampler
from tests.measured import within


class FixedGrid:
    """The one grid method ``sample_nodes`` uses."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _rounds(grid: Any, n: int = 5) -> list[list[int]]:
    return [strategy_utils.sample_nodes(grid, 2, 3)[0] for _ in range(n)]


def test_a_seeded_sampler_repeats_whatever_else_draws_from_random() -> None:
    grid = FixedGrid(list(range(100, 140)))
    with flower_samples_with(node_sampler(7, secret=False)):
        first = _rounds(grid)
    with flower_samples_with(node_sampler(7, secret=False)):
        random.seed(123)
        again = []
        for _ in range(5):
            random.random()  # another thread's draws (Ray's start-up) no longer shift the sample
            again += _rounds(grid, 1)
    with flower_samples_with(node_sampler(8, secret=False)):
        other = _rounds(grid)

    assert first == again
    assert other != first
    assert all(len(set(s)) == 3 and set(s) <= set(grid.node_ids) for s in first)


def test_client_level_dp_samples_with_the_operating_systems_generator() -> None:
    sampler = node_sampler(7, secret=True)
    with flower_samples_with(sampler):
        assert isinstance(sampler, random.SystemRandom)
        assert getattr(strategy_utils, SAMPLER_ATTR) is sampler
        grid = FixedGrid(list(range(1000)))
        assert _rounds(grid, 3) != _rounds(grid, 3)  # 1 in ~10^26 of a false failure
    assert getattr(strategy_utils, SAMPLER_ATTR) is random


@pytest.mark.measured
def test_poisson_sampling_draws_each_device_independently_with_rate_k_over_n() -> None:
    """Through Flower's own ``sample_nodes``: asked for 3 of 40, every device joins with
    probability 3/40 on its own — the cohort size is Binomial(40, 3/40), 0 included."""
    sampler = node_sampler(7, secret=True, poisson=True)
    grid = FixedGrid(list(range(100, 140)))
    draws = 4000
    with flower_samples_with(sampler):
        samples = [strategy_utils.sample_nodes(grid, 2, 3)[0] for _ in range(draws)]
    sizes = np.array([len(s) for s in samples])
    q, n = 3 / 40, 40
    # mean size n*q = 3 with standard error sqrt(n q (1-q) / draws) = 0.026
    within("|mean cohort - 3| in standard errors",
           abs(sizes.mean() - n * q) / np.sqrt(n * q * (1 - q) / draws), below=5)
    # P(empty) = (1 - q)^n = 0.044: about 177 of 4000 (standard error 13)
    empty = float((sizes == 0).sum())
    p0 = (1 - q) ** n
    within("|empty draws - expected| in standard errors",
           abs(empty - draws * p0) / np.sqrt(draws * p0 * (1 - p0)), below=5)
    per_node = np.array([sum(node in s for s in samples) for node in grid.node_ids]) / draws
    within("most frequent device's rate / q", per_node.max() / q, below=1.3)
    assert all(len(set(s)) == len(s) for s in samples)


def test_poisson_sampling_is_only_for_the_secret_sampler() -> None:
    with pytest.raises(ValueError, match="client-level DP"):
        node_sampler(7, secret=False, poisson=True)
