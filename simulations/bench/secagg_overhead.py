"""Benchmark: what secure aggregation costs per round, against plain FedAvg, same run.

    python -m simulations.bench.secagg_overhead                  # 10 and 100 clients
    python -m simulations.bench.secagg_overhead --clients 10 --dim 100000

One round of the real coordinator strategy (:class:`server.secagg.SecAggFedAvg` vs
:class:`server.strategy.AdapterFedAvg` with uniform weights) and fedtune's real ClientApp
(:func:`client.app.make_client_app`: the train handler with its decoding, upload encoding,
packing and masking, and the SecAgg stages), delivered in-process through Flower's protobuf
serialisation (:class:`simulations.loopback_grid.LoopbackGrid`). Only the trainer is
replaced, by :class:`RandomUpdateTrainer`: a random update of the adapter's trainable size
(SmolLM2-135M, r = 8 on q/v/o/up/down, FFA-LoRA: B only = 829,440 floats by default).
Training costs the same with or without SecAgg, so what is measured is the protocol; the
upload itself is whatever the ClientApp makes of the trained tensors. SecAgg runs
authenticated, as every simulation does (identity keys, a signed roster, signed adverts and
the consistency round). Reported per round:
client CPU seconds (mean per client over all its handlers; the client's share of decoding,
key agreement, Shamir sharing, sealing, PRG masks, unmasking, encoding), coordinator CPU
seconds (routing, unmasking, Shamir reconstruction, decoding, validation), and payload
bytes per client up and down; ratios are SecAgg / plain from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ConfigRecord
from flwr.clientapp import ClientApp

from client.local_data import LocalData, simulated_device_folder
from client.trainer import EvalOutcome, TrainInstruction, TrainOutcome
from kernels.data.examples import Example
from kernels.data.formats import write_jsonl
from protocols import keys
from protocols.adapter_spec import AdapterSpec
from protocols.codecs import to_record
from protocols.run_config import PathsSection, RunConfig
from server.secagg import SecAggFedAvg
from server.strategy import AdapterFedAvg
from simulations.flower_patches import task_identity
from simulations.loopback_grid import LoopbackGrid
from simulations.organisation import simulated_organisation

#: SmolLM2-135M (30 layers, hidden 576, kv 192, mlp 1536), r = 8: rows of B per layer for
#: q, v, o, up, down; B is (out_features, r).
SMOLLM2_B_FLOATS = 30 * (576 + 192 + 576 + 1536 + 576) * 8
#: The synthetic update's scale: well inside SecAgg's fixed-point clip range.
UPDATE_STD = 1e-3


class RandomUpdateTrainer:
    """The :class:`client.trainer.Trainer` seam, with "training" a seeded random step.

    The ClientApp seeds each client's instruction from the round seed and its partition id,
    so the clients of a round move the adapter differently and reruns repeat exactly.
    """

    def __init__(self, trainable: frozenset[str]) -> None:
        self.trainable = trainable

    def train(self, adapter: Mapping[str, npt.NDArray[Any]], data: LocalData,
              instruction: TrainInstruction) -> TrainOutcome:
        rng = np.random.default_rng(instruction.seed)
        tensors = {k: (adapter[k] + UPDATE_STD * rng.standard_normal(adapter[k].shape))
                   .astype(np.float32) for k in sorted(self.trainable)}
        return TrainOutcome(tensors, num_examples=instruction.local_steps
                            * instruction.batch_size)

    def evaluate(self, adapter: Mapping[str, npt.NDArray[Any]], data: LocalData, *,
                 seq_len: int, batch_size: int) -> EvalOutcome:
        raise NotImplementedError("the benchmark runs no federated evaluation")


@contextlib.contextmanager
def fedtune_client_app(spec: AdapterSpec, clients: int
                       ) -> Iterator[tuple[ClientApp, dict[str, Any]]]:
    """fedtune's own ClientApp for ``clients`` partitions, with its trainer replaced by a
    :class:`RandomUpdateTrainer` while the context lasts (``client.app._trainer`` is the one
    place the ClientApp gets its trainer from; nothing else of it is touched)."""
    from unittest import mock

    import client.app as client_app

    trainer = RandomUpdateTrainer(frozenset(spec.trainable_keys))
    with tempfile.TemporaryDirectory(prefix="fedtune-secagg-bench-") as tmp:
        devices = Path(tmp) / "devices"  # the data path stays the real one: a folder each
        for i in range(clients):
            folder = simulated_device_folder(devices, i)
            folder.mkdir(parents=True)
            for part in ("train", "heldout"):
                write_jsonl(folder / f"{part}.jsonl", [Example(text="synthetic")])
        # Authenticated, as every simulation runs it: identity keys, a signed roster.
        org = simulated_organisation(devices, clients, Path(tmp), min_nodes=min(3, clients))
        flat = {**RunConfig().to_flat(),
                **PathsSection(cache_dir=Path(tmp), devices_dir=devices,
                               secagg_roster=org.roster_text,
                               roster_public_key=org.org_public_key).to_flat()}
        with mock.patch.object(client_app, "_trainer", lambda _flat, edge=False, rank=0: trainer):
            yield client_app.make_client_app(flat), flat


def one_round(n: int, dim: int, *, secure: bool, seed: int = 0) -> dict[str, Any]:
    adapter = {"b": np.zeros(dim, np.float32)}
    spec = AdapterSpec.from_arrays(adapter, {})
    sampling: dict[str, Any] = {"fraction_train": 1.0, "min_train_nodes": n,
                                "min_available_nodes": n}
    rng = np.random.default_rng(seed)
    nodes = [int(x) for x in rng.integers(1, 2**63, size=n)]
    config = ConfigRecord({keys.LOCAL_STEPS: 1, keys.BATCH_SIZE: 1, keys.LEARNING_RATE: 0.1,
                           keys.SEQ_LEN: 8, keys.SEED: seed})
    with fedtune_client_app(spec, n) as (app, flat):
        roster = PathsSection.from_flat(flat).secagg_roster
        strategy: AdapterFedAvg = (
            SecAggFedAvg(spec, roster=roster, **sampling) if secure
            else AdapterFedAvg(spec, weighting="uniform", **sampling))
        grid = LoopbackGrid(app, nodes,
                            node_config={node: {"partition-id": i}
                                         for i, node in enumerate(nodes)})
        wall, cpu = time.perf_counter(), time.process_time()
        messages = strategy.configure_train(1, to_record(adapter), config,
                                            grid)  # type: ignore[arg-type]
        replies = grid.send_and_receive(messages)
        arrays, _ = strategy.aggregate_train(1, replies)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stats = strategy.stats[1]
    if arrays is None or stats.accepted != n:
        raise RuntimeError(f"{n} clients, {'secagg' if secure else 'plain'}: the round "
                           f"aggregated {stats.accepted} of {n} updates (rejected: "
                           f"{stats.rejections})")
    client_cpu = sum(sum(per.values()) for per in grid.client_cpu_s.values())
    return {
        "clients": n, "dim": dim, "secagg": secure, "wall_s": wall,
        "client_cpu_s_per_client": client_cpu / n,
        "coordinator_cpu_s": cpu - client_cpu,
        "up_bytes_per_client": stats.bytes_up / n,
        "down_bytes_per_client": stats.bytes_down / n,
        "stage_client_cpu_s": {k: sum(v.values()) / n for k, v in grid.client_cpu_s.items()},
    }


def render(rows: list[dict[str, Any]]) -> str:
    head = (f"{'clients':>7} {'mode':>7} {'client CPU s':>12} {'coord CPU s':>11} "
            f"{'up KB/cl':>9} {'down KB/cl':>10}   ratios secagg/plain")
    lines = [head, "-" * len(head)]
    by = {(r["clients"], r["secagg"]): r for r in rows}
    for (n, secure), r in sorted(by.items()):
        line = (f"{n:>7} {'secagg' if secure else 'plain':>7} "
                f"{r['client_cpu_s_per_client']:>12.3f} {r['coordinator_cpu_s']:>11.3f} "
                f"{r['up_bytes_per_client'] / 1e3:>9.1f} {r['down_bytes_per_client'] / 1e3:>10.1f}")
        if secure and (n, False) in by:
            p = by[(n, False)]

            def ratio(key: str, r: dict[str, Any] = r, p: dict[str, Any] = p) -> float:
                return float(r[key] / p[key])

            line += (f"   client CPU {ratio('client_cpu_s_per_client'):.1f}x"
                     f", coordinator CPU {ratio('coordinator_cpu_s'):.1f}x"
                     f", up bytes {ratio('up_bytes_per_client'):.3f}x"
                     f", down bytes {ratio('down_bytes_per_client'):.3f}x")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.secagg_overhead",
        description="Secure aggregation overhead per round vs plain FedAvg (same run).",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100],
                        help="cohort sizes to measure (default: 10 100)")
    parser.add_argument("--dim", type=int, default=SMOLLM2_B_FLOATS,
                        help=f"update length in floats (default {SMOLLM2_B_FLOATS}: SmolLM2 "
                             f"FFA-LoRA B, r=8)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows = []
    # Messages are stamped with the sending task's identity; a ServerApp process has one at
    # run time, this in-process benchmark sets it as Flower's own simulation entry does.
    with task_identity():
        for n in args.clients:
            for secure in (False, True):
                rows.append(one_round(n, args.dim, secure=secure))
                print(f"measured {n} clients, {'secagg' if secure else 'plain'}: "
                      f"{rows[-1]['wall_s']:.1f} s wall", file=sys.stderr)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
