"""Benchmark: one DP-SGD LoRA step against one ordinary LoRA step, same model, same batch.

    python -m simulations.bench.dpsgd_step                  # SmolLM2 if prepared
    python -m simulations.bench.dpsgd_step --model DIR --steps 2 --rounds 3 --modes hooks

Both paths train the same PEFT LoRA adapter (the ``[lora]`` defaults) with AdamW on the same
fixed batch of random token ids, ``--threads`` torch threads. The private step is
:func:`client.dp_sgd.dp_train` itself, fed exactly the batch's blocks with
``batch_size = len(blocks)`` so the Poisson rate is 1 and every step sees the whole batch:
per-sample gradients, clipping, noise and the optimizer, timed between consecutive steps.

The variants are interleaved: each of ``--rounds`` rounds runs ``--steps`` steps of every
variant, after one untimed warm-up round, so load drift on a shared machine hits all of them
alike. Each ``dp_train`` call's first step also pays for attaching Opacus's hooks; it is
dropped from the step times and the attach+detach cost is reported on its own. Reported per
variant: median wall seconds and median process CPU seconds per step (with one thread the
CPU time is the steadier measure on a busy machine), both as ratios to the ordinary step
(goal <= 1.3x), and the process's peak RSS so far.

Peak RSS mostly shows glibc keeping freed heap: with ``MALLOC_MMAP_THRESHOLD_=65536`` the
hooks mode's peak was 42 MB above the ordinary step's on SmolLM2 (per-sample LoRA gradients
are 4 x 1.75 M floats = 28 MB), against ~300 MB with the default allocator settings.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _deltas(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(b[0] - a[0], b[1] - a[1]) for a, b in pairwise(stamps)]


def main(argv: list[str] | None = None) -> int:
    from kernels.base_model import converted_dir
    from protocols.cache_dir import default_cache_dir

    default_model = converted_dir(default_cache_dir())
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.dpsgd_step",
        description="Time a DP-SGD (Opacus) LoRA step against a non-private LoRA step.",
    )
    parser.add_argument("--model", type=Path, default=default_model,
                        help=f"local causal-LM folder (default: {default_model})")
    parser.add_argument("--batch", type=int, default=4, help="blocks per step")
    parser.add_argument("--seq", type=int, default=64, help="tokens per block")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--modes", default="hooks,ghost",
                        help="Opacus grad_sample modes, comma-separated: hooks,ghost,functorch")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model}: run `fedtune prepare` or pass --model DIR",
              file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    import numpy as np
    import opacus.grad_sample  # noqa: F401  # import time is not a step's cost
    import torch

    from client.dp_sgd import DpSgdSettings, dp_train
    from kernels.base_model import load_causal_lm
    from kernels.lora import attach_lora, get_adapter, set_adapter
    from protocols.run_config import LoraSection

    torch.set_num_threads(args.threads)
    loaded = load_causal_lm(args.model)
    lora = LoraSection(freeze_a=False)  # measured with plain LoRA (BENCHMARKS.md)
    model = attach_lora(loaded.model, lora)
    start = get_adapter(model)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    blocks = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq), dtype=np.int64)
    batch = torch.from_numpy(blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"model {args.model.name}: LoRA r={lora.r} on {lora.target_modules}, "
          f"{sum(p.numel() for p in params):,} trainable; batch {args.batch} x {args.seq} "
          f"tokens, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")

    def plain(steps: int) -> list[tuple[float, float]]:
        """What TorchLoraTrainer.train does per step without DP."""
        set_adapter(model, start)
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        model.train()
        stamps = [_clock()]
        for _ in range(steps):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append(_clock())
        model.eval()
        return _deltas(stamps)

    def private(mode: str, steps: int) -> tuple[list[tuple[float, float]], float]:
        set_adapter(model, start)
        settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                                 grad_sample_mode=mode)
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        t0 = time.perf_counter()
        dp_train(model, blocks, optimizer, settings=settings, batch_size=args.batch, steps=0)
        attach = time.perf_counter() - t0
        stamps = [_clock()]
        dp_train(model, blocks, optimizer, settings=settings, batch_size=args.batch,
                 steps=steps + 1, seed=0, on_step=lambda *_: stamps.append(_clock()))
        return _deltas(stamps)[1:], attach  # the first step also attached the hooks

    variants = ["no DP", *(f"DP-SGD {m}" for m in modes)]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    attach: dict[str, list[float]] = {v: [] for v in variants}
    rss: dict[str, float] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not timed
        for name in variants:
            if name == "no DP":
                got, cost = plain(args.steps if round_ else 1), 0.0
            else:
                got, cost = private(name.removeprefix("DP-SGD "), args.steps if round_ else 1)
            if round_:
                times[name] += got
                attach[name].append(cost)
            if not round_:  # peak so far, in the order the variants first ran
                rss[name] = _peak_rss_mb()

    base: Any = None
    print(f"{'variant':<18} {'wall s/step':>11} {'x no-DP':>8} {'CPU s/step':>11} "
          f"{'x no-DP':>8} {'attach+detach s':>16} {'peak RSS MB':>12}")
    for name in variants:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        base = base or (wall, cpu)
        print(f"{name:<18} {wall:>11.3f} {wall / base[0]:>8.2f} {cpu:>11.3f} "
              f"{cpu / base[1]:>8.2f} {statistics.median(attach[name]):>16.4f} "
              f"{rss[name]:>12.0f}")
    print(f"goal: DP-SGD step <= 1.3x the ordinary step; medians of {args.rounds} interleaved "
          f"rounds x {args.steps} steps; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
