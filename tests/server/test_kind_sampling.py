"""Sampling by kind (edge.role = 'judge', edge.judges): which devices train and which only
judge, walking the round's random order and asking kinds only as needed."""

from __future__ import annotations

import pytest

from server.kind_sampling import sample_by_kind

#: nodes 1..10 in the round's order; the edge devices among them
EDGE = {2, 3, 5, 8, 9}
ORDER = [4, 2, 7, 3, 9, 1, 5, 10, 8, 6]


class Asker:
    """Answers kinds from EDGE, except for the ``silent`` nodes; remembers every batch."""

    def __init__(self, silent: frozenset[int] = frozenset()) -> None:
        self.silent = silent
        self.batches: list[list[int]] = []

    def __call__(self, nodes: list[int]) -> dict[int, bool]:
        self.batches.append(list(nodes))
        return {n: n in EDGE for n in nodes if n not in self.silent}


def test_torch_devices_train_and_edge_devices_judge_in_the_rounds_order() -> None:
    known: dict[int, bool] = {}
    ask = Asker()
    draw = sample_by_kind(ORDER, known, ask, trainers=2, judges=2, torch_trainers=True)
    assert draw.trainers == [4, 7]  # the first two torch devices of the order
    assert draw.judges == [2, 3]  # the first two edge devices
    # twice as many asked as slots are open: 8 at once covers them all here
    assert ask.batches == [ORDER[:8]] and draw.asked == 8
    assert known == {n: n in EDGE for n in ORDER[:8]}
    # the next round asks only the devices it has not heard from (6 and 8 of its batch
    # 6, 8, 10, 5, 1, 9); a round of known devices asks nobody
    again = sample_by_kind(ORDER[::-1], known, ask, trainers=2, judges=1, torch_trainers=True)
    assert (again.trainers, again.judges, again.asked) == ([6, 10], [8], 2)
    assert ask.batches == [ORDER[:8], [6, 8]]
    third = sample_by_kind(ORDER, known, ask, trainers=2, judges=2, torch_trainers=True)
    assert (third.trainers, third.judges, third.asked) == ([4, 7], [2, 3], 0)
    assert len(ask.batches) == 2


def test_batches_grow_only_with_the_open_slots() -> None:
    ask = Asker()
    draw = sample_by_kind(ORDER, {}, ask, trainers=1, judges=0, torch_trainers=True)
    assert (draw.trainers, draw.judges) == ([4], [])
    assert ask.batches == [[4, 2]]


def test_a_silent_device_is_skipped_and_asked_again_next_round() -> None:
    known: dict[int, bool] = {}
    draw = sample_by_kind(ORDER, known, Asker(silent=frozenset({4, 2})), trainers=2,
                          judges=1, torch_trainers=True)
    assert (draw.trainers, draw.judges) == ([7, 1], [3])
    assert 4 not in known and 2 not in known


def test_too_few_torch_devices_gives_a_smaller_sample_not_edge_trainers() -> None:
    draw = sample_by_kind([2, 3, 5, 4], {}, Asker(), trainers=2, judges=5, torch_trainers=True)
    assert (draw.trainers, draw.judges) == ([4], [2, 3, 5])


def test_with_role_train_the_uniform_sample_trains_and_judges_come_from_the_rest() -> None:
    """edge.role = 'train' with edge.judges: the sample already drawn trains (of any kind,
    and it is not asked), and the judges are edge devices outside it."""
    ask = Asker()
    draw = sample_by_kind(ORDER, {}, ask, trainers=2, judges=2, torch_trainers=False,
                          chosen=[2, 10])
    assert draw.trainers == [2, 10]
    assert draw.judges == [3, 9]
    assert all(2 not in b and 10 not in b for b in ask.batches)


def test_negative_slots_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        sample_by_kind(ORDER, {}, Asker(), trainers=-1, judges=0, torch_trainers=True)
