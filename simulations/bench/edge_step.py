"""Benchmark: a forward-only (MeZO) edge step vs a torch backprop LoRA step, same run.

    python -m simulations.bench.edge_step                 # SmolLM2, B=4, S=64, 1 thread
    python -m simulations.bench.edge_step --steps 5

Each side runs in its own process, so peak RSS (``ru_maxrss``) is that side's alone:

* edge: :class:`client.edge_trainer.EdgeMeZOTrainer` on the signed ONNX export (the
  default quantization, exported by ``fedtune export-edge`` into the cache if missing) —
  two ORT forward passes per step, no torch imported;
* torch: :class:`client.torch_trainer.TorchLoraTrainer` (PEFT LoRA, AdamW, backprop), the
  GPU client's code on this CPU.

Both train the same adapter (FFA-LoRA, r = 8) on the same simulated device's own data folder
(a role's speeches with the default ``[data]``). Also reported: the upload of one round of
each, encoded exactly as the client sends it (seed/scalar pairs vs dense fp32 B tensors).
Ratios are edge / torch from the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from protocols.config_file import add_config_arguments
from protocols.run_config import LoraSection

WORKER = """
import json, resource, sys, time
from pathlib import Path
side, export, model = sys.argv[1:4]
steps, batch, seq = map(int, sys.argv[4:7])
from client.local_data import DeviceDataSource, load_device_data
from client.trainer import TrainInstruction
from protocols.run_config import LoraSection
data = load_device_data(DeviceDataSource(Path(sys.argv[7])), sys.argv[8])
lora = LoraSection.from_mapping(json.loads(sys.argv[9]))
t0 = time.perf_counter()
if side == "edge":
    from client.edge_trainer import EdgeMeZOTrainer
    trainer = EdgeMeZOTrainer.from_export(Path(export), lora)
    lr = 1e-3
else:
    from client.torch_trainer import TorchLoraTrainer
    trainer = TorchLoraTrainer(Path(model), lora, threads=1)
    lr = 1e-3
load_s = time.perf_counter() - t0
if side == "edge":
    import numpy as np
    adapter = {k: np.zeros(s, np.float32) for k, s in trainer.model.adapter_shapes.items()}
else:
    from kernels.lora import get_adapter
    adapter = get_adapter(trainer.model)
def run(n):
    inst = TrainInstruction(server_round=1, local_steps=n, batch_size=batch, learning_rate=lr,
                            seq_len=seq, seed=0)
    start = time.perf_counter()
    out = trainer.train(adapter, data, inst)
    return time.perf_counter() - start, out
run(1)  # warm-up: first-call allocations, block cutting
wall, out = run(steps)
from protocols.codecs import ClientUpdate, RoundContext, get_codec
update = ClientUpdate({k: v - adapter[k] for k, v in out.tensors.items()},
                      getattr(out, "seed_update", None))
codec = get_codec("seed-scalar" if side == "edge" else "fp32")
upload = codec.encode(update, RoundContext(global_adapter=adapter, server_round=1))
nbytes = sum(len(a.data) for a in upload.values())
print(json.dumps({"side": side, "load_s": load_s, "step_s": wall / steps,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "upload_bytes": nbytes, "torch_imported": "torch" in sys.modules}))
"""


def _side(side: str, args: argparse.Namespace, export: Path, model: Path,
          device: tuple[Path, str], lora: LoraSection) -> dict[str, Any]:
    """One side in its own process, on ``device``: a simulated device's (folder, name)."""
    folder, name = device
    cmd = [sys.executable, "-c", WORKER, side, str(export), str(model), str(args.steps),
           str(args.batch), str(args.seq), str(folder), name, json.dumps(lora.to_mapping())]
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.edge_step",
        description="MeZO edge step (ONNX Runtime) vs torch backprop LoRA step: time, peak "
                    "RSS and upload bytes, each side in its own process.")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--partition", type=int, default=0,
                        help="which simulated device's data (a role's, for Shakespeare)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    add_config_arguments(parser)  # --config / --set: e.g. model.source=DIR for another model
    args = parser.parse_args(argv)

    from protocols.cache_dir import default_cache_dir
    from protocols.config_file import load_config
    from protocols.environment import configure_environment
    from server.edge_artifacts import ensure_edge_export
    from simulations.runner import check_inputs

    configure_environment()
    cache = args.cache_dir or default_cache_dir()
    config = load_config(args.config, args.overrides)
    inputs = check_inputs(config, cache)
    export = ensure_edge_export(inputs.model_dir, cache, config)
    devices = inputs.devices
    assert devices is not None
    if not 0 <= args.partition < devices.num_clients:
        parser.error(f"--partition {args.partition}: the data makes {devices.num_clients} "
                     "devices")
    device = (devices.folder(args.partition), devices.names[args.partition])
    rows = [_side(side, args, export, inputs.model_dir, device, config.lora)
            for side in ("edge", "torch")]
    edge, torch = rows
    print(f"{'side':>6} {'step s':>8} {'peak RSS MB':>12} {'upload bytes':>13} {'load s':>7} "
          f"{'torch imported':>15}")
    for r in rows:
        print(f"{r['side']:>6} {r['step_s']:>8.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['upload_bytes']:>13,} {r['load_s']:>7.1f} {r['torch_imported']!s:>15}")
    print(f"edge / torch: step time {edge['step_s'] / torch['step_s']:.2f}x, peak RSS "
          f"{edge['peak_rss_mb'] / torch['peak_rss_mb']:.2f}x, upload "
          f"{edge['upload_bytes'] / torch['upload_bytes']:.5f}x "
          f"({edge['upload_bytes']} B vs {torch['upload_bytes']:,} B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
