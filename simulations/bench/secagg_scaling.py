"""Benchmark: one secure-aggregation round as the cohort grows — SecAgg against SecAgg+.

    python -m simulations.bench.secagg_scaling                      # 10, 100, 400 clients
    python -m simulations.bench.secagg_scaling --clients 10,100 --dim 20000

One round of the real coordinator strategy and fedtune's real ClientApp (every handler:
decoding, key agreement, Shamir sharing, sealing, PRG masks, consistency signatures,
unmasking) delivered in-process through Flower's protobuf serialisation
(:class:`simulations.loopback_grid.LoopbackGrid`), with the trainer replaced by a seeded
random update (:class:`simulations.bench.secagg_overhead.RandomUpdateTrainer`) so what is
timed is the protocol. Three modes per cohort size ``n``, measured in the same run:

* ``plain``  — :class:`server.strategy.AdapterFedAvg`, uniform weights (no protection);
* ``secagg`` — :class:`server.secagg.SecAggFedAvg` on the complete graph (Bonawitz et al.
  2017): every client masks against all ``n - 1`` others;
* ``secagg+`` — the same strategy with ``neighbours = 2 ceil(log2 n)`` (Bell et al. 2020;
  the complete graph when that leaves no node out): each client masks against ``k``.

Both secure modes run authenticated (a signed roster, signed adverts, the consistency
round), as every simulation does. Columns: clients, mode, the graph degree (``n-1`` on the
complete graph), the round's wall seconds (configure + train exchange + aggregate, all
clients included: they run in this process, one after another), its ratio to ``plain``;
the CPU seconds of the slowest client's handlers and of the coordinator (the round's wall
time less all clients' CPU: routing, Shamir reconstruction, the dropped pairs' masks,
decoding), and their sum, the round as devices working in parallel would see it (no
training, no network), with its ratio to ``plain``; and the coordinator's peak traced
memory in the aggregate step (``tracemalloc``, so numpy buffers are counted but interpreter
overhead is not).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tracemalloc
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from protocols import keys
from protocols.adapter_spec import AdapterSpec
from protocols.codecs import to_record
from protocols.run_config import PathsSection
from protocols.secagg.graph import is_complete
from server.secagg import SecAggFedAvg
from server.strategy import AdapterFedAvg
from simulations.bench.secagg_overhead import fedtune_client_app
from simulations.flower_patches import task_identity
from simulations.loopback_grid import LoopbackGrid

MODES = ("plain", "secagg", "secagg+")
DEFAULT_DIM = 20_000


def plus_degree(n: int) -> int:
    """SecAgg+'s degree for ``n`` clients: ``2 ceil(log2 n)`` (even by construction)."""
    return 2 * math.ceil(math.log2(max(n, 2)))


def one_round(n: int, dim: int, mode: str, *, seed: int = 0) -> dict[str, Any]:
    adapter = {"b": np.zeros(dim, np.float32)}
    spec = AdapterSpec.from_arrays(adapter, {})
    sampling: dict[str, Any] = {"fraction_train": 1.0, "min_train_nodes": n,
                                "min_available_nodes": n}
    nodes = [int(x) for x in np.random.default_rng(seed).integers(1, 2**63, size=n)]
    config = ConfigRecord({keys.LOCAL_STEPS: 1, keys.BATCH_SIZE: 1, keys.LEARNING_RATE: 0.1,
                           keys.SEQ_LEN: 8, keys.SEED: seed})
    degree = plus_degree(n) if mode == "secagg+" else 0
    with fedtune_client_app(spec, n) as (app, flat):
        roster = PathsSection.from_flat(flat).secagg_roster
        strategy: AdapterFedAvg = (
            AdapterFedAvg(spec, weighting="uniform", **sampling) if mode == "plain"
            else SecAggFedAvg(spec, roster=roster, neighbours=degree, **sampling))
        grid = LoopbackGrid(app, nodes, node_config={node: {"partition-id": i}
                                                     for i, node in enumerate(nodes)},
                            keep_traffic=False)
        wall = time.perf_counter()
        messages = strategy.configure_train(1, to_record(adapter), config,
                                            grid)  # type: ignore[arg-type]
        replies = grid.send_and_receive(messages)
        tracemalloc.start()
        try:
            arrays, _ = strategy.aggregate_train(1, replies)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        wall = time.perf_counter() - wall
    stats = strategy.stats[1]
    if arrays is None or stats.accepted != n:
        raise RuntimeError(f"{n} clients, {mode}: the round aggregated {stats.accepted} of "
                           f"{n} updates (rejected: {stats.rejections})")
    shown = n - 1 if mode == "plain" or is_complete(n, degree) else degree
    per_client: dict[int, float] = {}
    for stage in grid.client_cpu_s.values():
        for node, seconds in stage.items():
            per_client[node] = per_client.get(node, 0.0) + seconds
    coordinator = wall - sum(per_client.values())
    slowest = max(per_client.values())
    return {"clients": n, "mode": mode, "degree": shown, "round_s": wall,
            "slowest_client_s": slowest, "coordinator_s": coordinator,
            "parallel_s": slowest + coordinator, "peak_mb": peak / 2**20}


def render(rows: list[dict[str, Any]]) -> str:
    head = (f"{'clients':>7} {'mode':>8} {'degree':>6} {'round s':>9} {'x plain':>8} "
            f"{'client s':>9} {'coord s':>8} {'parallel s':>10} {'x plain':>8} "
            f"{'coord peak MB':>13}")
    lines = [head, "-" * len(head)]
    plain = {r["clients"]: r for r in rows if r["mode"] == "plain"}
    for r in rows:
        base = plain[r["clients"]]
        degree = "-" if r["mode"] == "plain" else str(r["degree"])
        lines.append(
            f"{r['clients']:>7} {r['mode']:>8} {degree:>6} {r['round_s']:>9.3f} "
            f"{r['round_s'] / base['round_s']:>7.2f}x {r['slowest_client_s']:>9.3f} "
            f"{r['coordinator_s']:>8.3f} {r['parallel_s']:>10.3f} "
            f"{r['parallel_s'] / base['parallel_s']:>7.2f}x {r['peak_mb']:>13.2f}")
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not sizes or min(sizes) < 3:
        raise argparse.ArgumentTypeError("every cohort needs at least 3 clients")
    return sizes


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or "plain" not in modes:
        raise argparse.ArgumentTypeError(
            f"modes must be among {list(MODES)} and include 'plain' (the ratios' baseline); "
            f"got {text!r}")
    return [m for m in MODES if m in modes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.secagg_scaling",
        description="Time of one secure-aggregation round vs clients per round: plain "
                    "FedAvg, SecAgg (complete graph) and SecAgg+ (degree 2 ceil(log2 n)).")
    parser.add_argument("--clients", type=_sizes, default=[10, 100, 400],
                        help="comma-separated cohort sizes (default: 10,100,400)")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM,
                        help=f"update length in floats (default {DEFAULT_DIM})")
    parser.add_argument("--modes", type=_modes, default=list(MODES),
                        help="comma-separated modes to measure, 'plain' included for the "
                             "ratios (default: plain,secagg,secagg+; full SecAgg at 1,000 "
                             "clients takes about an hour on two cores)")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows = []
    with task_identity():
        for n in args.clients:
            for mode in args.modes:
                rows.append(one_round(n, args.dim, mode))
                print(f"measured {n} clients, {mode}: {rows[-1]['round_s']:.1f} s "
                      f"(client {rows[-1]['slowest_client_s']:.3f} s, coordinator "
                      f"{rows[-1]['coordinator_s']:.1f} s, peak {rows[-1]['peak_mb']:.1f} MB)",
                      file=sys.stderr, flush=True)
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
