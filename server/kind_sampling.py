"""Which devices a round trains and which only judge: sampling by kind (``edge.role``,
``edge.judges``).

Why: in a federation where half the devices cannot backpropagate, a uniform sample gives
half of each round's training slots to forward-only devices, whose MeZO steps barely move
the adapter (BENCHMARKS.md, "Edge levers": with two devices a round the torch half trains 9
updates where torch devices only train 20, and no forward-only lever made that up). What a
forward-only device does well is score a candidate adapter exactly, on its own data. So
with ``edge.role = 'judge'`` a round's training slots go to torch devices and edge devices
judge the length of the round's step (``edge.line_search``): each kind does what it can,
as capability-aware client selection does (FedCS, Oort). ``edge.judges`` adds judges
outside the training sample with either role.

How: the coordinator does not know a device's kind before it has heard from it. It walks
the connected devices in the round's random order (the run's sampler: reproducible from
``train.seed`` and the round, like the uniform sample), asks every device it has not heard
from its kind with a small query (``query.kind``, one number back), a few at a time, and
takes torch devices into the training sample until it has ``clients_per_round`` and edge
devices as judges until it has ``edge.judges``. Kinds are remembered for the run (and
learnt from train replies), so later rounds ask few devices. A kind is a device's claim; it
decides only what the device is asked to do, never how its update is weighed (an update is
validated by what it is, as every other).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

#: Asks the kinds of some devices: {node: is_edge} for those that answered.
AskKinds = Callable[[list[int]], Mapping[int, bool]]


@dataclass
class KindSample:
    """One round's draw: the devices that train, those that only judge, and how many
    devices had to be asked their kind."""

    trainers: list[int] = field(default_factory=list)
    judges: list[int] = field(default_factory=list)
    asked: int = 0


def sample_by_kind(order: Sequence[int], known: dict[int, bool], ask: AskKinds, *,
                   trainers: int, judges: int, torch_trainers: bool,
                   chosen: Sequence[int] = ()) -> KindSample:
    """Walk ``order`` (the round's random permutation of the connected devices) and fill
    ``trainers`` training slots — with torch devices only when ``torch_trainers``, else with
    any device — and ``judges`` judging slots with edge devices that do not train.

    ``chosen``: devices already sampled to train (``edge.role = 'train'``: Flower's uniform
    sample); they fill training slots first and are never judges here. ``known`` holds the
    kinds learnt so far (updated in place with every answer); a device that does not answer
    ``ask`` is skipped this round. Devices are asked in order, twice as many at a time as
    slots are still open, so a round asks about as many as it needs, not the population.
    """
    if trainers < 0 or judges < 0:
        raise ValueError(f"trainers and judges must be >= 0, got {trainers} and {judges}")
    draw = KindSample(trainers=list(chosen)[:trainers])
    taken = set(chosen)
    rest = [n for n in order if n not in taken]
    at = 0

    def open_slots() -> int:
        return (trainers - len(draw.trainers)) + (judges - len(draw.judges))

    while open_slots() > 0 and at < len(rest):
        batch = rest[at:at + 2 * open_slots()]
        at += len(batch)
        unknown = [n for n in batch if n not in known]
        if unknown:
            draw.asked += len(unknown)
            known.update(ask(unknown))
        for node in batch:
            if node not in known:  # did not answer: skipped this round
                continue
            edge = known[node]
            if len(draw.trainers) < trainers and not (edge and torch_trainers):
                draw.trainers.append(node)
            elif edge and len(draw.judges) < judges:
                draw.judges.append(node)
    return draw
