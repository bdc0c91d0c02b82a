"""Benchmark: the coordinator's streaming aggregation against this machine's memcpy.

    python -m simulations.bench.aggregation                      # 1,000 updates of 1M values
    python -m simulations.bench.aggregation --updates 200 --params 262144

Issue 18's goal: the coordinator folds each reply into a running sum as it arrives
(decode, validate, accumulate, free), memory does not grow with the number of clients per
round, and aggregation runs at >= 50 % of the machine's memcpy bandwidth for 1,000 updates
of 1M parameters. One process, one core, measured in the same run:

* **memcpy**: ``numpy.copyto`` of a 256 MiB buffer (larger than any cache here) into
  another, the best of three: bytes copied per second.
* **aggregation**: :meth:`server.strategy.AdapterFedAvg.aggregate_train` over the updates as
  fp32 packed records, exactly as replies arrive, yielded one at a time (8 distinct payloads
  cycled; the messages made before the clock starts, as a grid hands them over): update
  bytes per second; then, traced, with each reply made as the round consumes it, the peak
  memory of the round against that of a round of a tenth of the updates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

GOAL = 0.5
KEY_A, KEY_B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def memcpy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes per second of ``numpy.copyto`` of ``nbytes`` (best of three)."""
    src = np.ones(nbytes // 8)
    dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return src.nbytes / best


def _payloads(params: int) -> list[Any]:
    from protocols.codecs import to_record
    from protocols.packing import pack_record

    rng = np.random.default_rng(1)
    return [pack_record(to_record({KEY_B: rng.normal(size=(params // 8, 8)).astype(
        np.float32) * 1e-3})) for _ in range(8)]


def _replies(payloads: list[Any], updates: int) -> Iterator[Any]:
    from flwr.app import Message, MetricRecord, RecordDict

    for i in range(updates):
        request = Message(RecordDict(), dst_node_id=10 + i, message_type="train",
                          group_id="1")
        yield Message(RecordDict({"arrays": payloads[i % 8],
                                  "metrics": MetricRecord({"num-examples": 1})}),
                      reply_to=request)


def aggregate(params: int, updates: int, *, traced: bool = False) -> dict[str, float]:
    """Seconds (and with ``traced``, the traced peak bytes) of one round of ``updates``
    replies; the replies' payloads are made before the clock starts."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from protocols.adapter_spec import AdapterSpec
    from protocols.codecs import to_record
    from server.strategy import AdapterFedAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    adapter = {KEY_A: np.zeros((8, params // 8), np.float32),
               KEY_B: np.zeros((params // 8, 8), np.float32)}
    strategy = AdapterFedAvg(AdapterSpec.from_arrays(adapter, {}, frozen=frozenset({KEY_A})),
                             weighting="uniform")
    strategy.begin_round(1, to_record(adapter), ConfigRecord())
    payloads = _payloads(params)
    # Timed: the replies as a grid hands them over (made beforehand; they share 8 payloads).
    # Traced: made one at a time while the round consumes them, so only what the strategy
    # keeps can add up.
    replies: Any = _replies(payloads, updates) if traced else list(_replies(payloads, updates))
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] if traced else 0
    tracemalloc.stop()
    if arrays is None or strategy.stats[1].accepted != updates:
        raise RuntimeError(f"aggregation accepted {strategy.stats[1].accepted} of {updates}")
    return {"seconds": seconds, "peak_bytes": float(peak)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.aggregation",
        description="Streaming aggregation throughput against memcpy, and its memory.")
    parser.add_argument("--updates", type=int, default=1000, help="replies in the round")
    parser.add_argument("--params", type=int, default=1 << 20,
                        help="values per update (a multiple of 8)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.params % 8 or args.params <= 0 or args.updates < 10:
        parser.error("--params must be a positive multiple of 8 and --updates at least 10")
    nbytes = 4 * args.params
    copy_bps = memcpy_bandwidth()
    full = aggregate(args.params, args.updates)  # timed without tracemalloc's overhead
    full["peak_bytes"] = aggregate(args.params, args.updates, traced=True)["peak_bytes"]
    tenth = aggregate(args.params, max(1, args.updates // 10), traced=True)
    agg_bps = nbytes * args.updates / full["seconds"]
    result = {"updates": args.updates, "params": args.params,
              "memcpy_gb_s": copy_bps / 1e9, "aggregation_gb_s": agg_bps / 1e9,
              "ratio": agg_bps / copy_bps, "seconds": full["seconds"],
              "peak_mb": full["peak_bytes"] / 1e6, "peak_mb_tenth": tenth["peak_bytes"] / 1e6}
    print(f"{'updates':>8} {'params':>9} {'memcpy GB/s':>12} {'aggregation GB/s':>17} "
          f"{'ratio':>6} {'goal':>5} {'peak MB':>8} {'peak MB (1/10)':>15}")
    print(f"{args.updates:>8} {args.params:>9} {result['memcpy_gb_s']:>12.2f} "
          f"{result['aggregation_gb_s']:>17.2f} {result['ratio']:>6.2f} "
          f"{'met' if result['ratio'] >= GOAL else '-':>5} {result['peak_mb']:>8.1f} "
          f"{result['peak_mb_tenth']:>15.1f}")
    print(f"goal: aggregation >= {GOAL:.0%} of memcpy bandwidth; peak memory flat in updates")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
