"""Benchmark: the edge client's ONNX forward against the torch fp32 eager forward.

    python -m simulations.bench.edge_forward                     # SmolLM2, both defaults
    python -m simulations.bench.edge_forward --quantization int8-smooth --reps 12
    python -m simulations.bench.edge_forward --table             # every option (~15 min)

All sides score the same batch (``--batch`` blocks of ``--seq`` tokens cut from the held-out
Shakespeare speeches, zero adapter): torch is the PEFT LoRA model the torch client trains
(``model(input_ids, labels).loss``), ORT is :class:`kernels.edge_runtime.EdgeModel` on a
cached export (``token_nll``, log-softmax inside the graph). By default two exports are
compared: the export default (``int4-gguf``, float activations, what MeZO training needs)
and the fastest option within 10% perplexity (``int8-smooth``, forward-only evaluation).
Goal: ORT >= 2x faster at a perplexity within 10% of torch fp32.

Perplexity uses ``--eval-blocks`` blocks spread over the held-out file. "MeZO err" is the
largest error of MeZO's projected gradients ``(L(θ+εz) - L(θ-εz)) / 2ε`` (ε = 1e-3, three
seeded directions z, a small random θ) relative to torch fp32's largest one: a forward whose
loss is not smooth in the adapter shows it at once.

Each side first runs alone in a fresh process (perplexity, MeZO gradients, peak RSS as
``VmHWM``: model + one scored batch); then one process loads every side and alternates their
forwards ``--reps`` times so that load drift on a shared machine hits all alike. With one
thread the process CPU time is the steadier measure on a busy box; wall time is reported
too. Every ratio comes from numbers measured in the same run. The first run exports the
model (~3 min per export); later runs reuse the exports in ``CACHE/edge``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # a type only: the measured processes import nothing more than before
    from protocols.adapter_spec import Tensors

RESULT = "RESULT "
MEZO_EPS = 1e-3
MEZO_DIRECTIONS = 3


class _Side:
    """One forward implementation: ``loss(blocks, adapter)`` and a timed ``forward()``."""

    def __init__(self, loss: Callable[[npt.NDArray[np.int64], Tensors], float],
                 forward: Callable[[], None]) -> None:
        self.loss, self.forward = loss, forward


def _peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` belongs to the process image and restarts at exec;
    ``ru_maxrss`` would also count the parent's peak inherited through fork (the export)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _load_side(spec: str, args: argparse.Namespace, batch: npt.NDArray[np.int64],
               zero: Tensors, inputs: dict[str, str]) -> _Side:
    """``torch``, ``edge:DIR`` or ``onnx:FILE``; every loss is a token-weighted mean."""
    kind, _, where = spec.partition(":")
    if kind == "torch":
        import torch

        from kernels.base_model import load_causal_lm
        from kernels.lm_eval import mean_token_loss
        from kernels.lora import attach_lora, set_adapter
        from protocols.run_config import LoraSection

        torch.set_num_threads(args.threads)
        model = attach_lora(load_causal_lm(args.model).model, LoraSection())
        x = torch.from_numpy(batch)

        def torch_loss(blocks: npt.NDArray[np.int64], adapter: Tensors) -> float:
            set_adapter(model, adapter)
            return mean_token_loss(model, blocks, args.batch)[0]

        def torch_forward() -> None:
            with torch.no_grad():
                model(input_ids=x, labels=x).loss.item()

        set_adapter(model, zero)
        return _Side(torch_loss, torch_forward)
    if kind == "edge":
        from kernels.edge_runtime import EdgeModel

        edge = EdgeModel(Path(where), threads=args.threads)

        def edge_loss(blocks: npt.NDArray[np.int64], adapter: Tensors) -> float:
            return float(np.log(edge.perplexity(blocks, adapter, batch_size=args.batch)))

        def edge_forward() -> None:
            edge.token_nll(batch, zero)

        return _Side(edge_loss, edge_forward)
    import onnxruntime as ort  # a bare graph (the --table)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(where, options, providers=["CPUExecutionProvider"])

    def feed(ids: npt.NDArray[np.int64], adapter: Tensors) -> dict[str, Any]:
        return {"input_ids": ids, **{inputs[k]: v for k, v in adapter.items()}}

    def onnx_loss(blocks: npt.NDArray[np.int64], adapter: Tensors) -> float:
        nll = [session.run(None, feed(blocks[i : i + args.batch], adapter))[0].reshape(-1)
               for i in range(0, len(blocks), args.batch)]
        return float(np.concatenate(nll).mean(dtype=np.float64))

    def onnx_forward() -> None:
        session.run(None, feed(batch, zero))

    return _Side(onnx_loss, onnx_forward)


def _mezo_gradients(side: _Side, batch: npt.NDArray[np.int64],
                    shapes: dict[str, tuple[int, ...]]) -> list[float]:
    """MeZO's projected gradients (L(θ+εz) - L(θ-εz)) / 2ε along seeded directions z."""
    rng = np.random.default_rng(0)
    theta = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    out = []
    for i in range(MEZO_DIRECTIONS):
        r = np.random.default_rng(100 + i)
        z = {k: r.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        plus = side.loss(batch, {k: theta[k] + MEZO_EPS * z[k] for k in theta})
        minus = side.loss(batch, {k: theta[k] - MEZO_EPS * z[k] for k in theta})
        out.append((plus - minus) / (2 * MEZO_EPS))
    return out


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a child process: load the sides, score the eval blocks, alternate timed forwards."""
    blocks: npt.NDArray[np.int64] = np.load(args.blocks)
    batch = blocks[: args.batch]
    entries = json.loads(args.config.read_text(encoding="utf-8"))["adapter"]
    shapes = {e["key"]: tuple(e["shape"]) for e in entries}
    inputs = {e["key"]: e["input"] for e in entries}
    zero = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    sides: dict[str, _Side] = {}
    out: dict[str, dict[str, Any]] = {}
    for spec in args.sides.split(","):
        start = time.perf_counter()
        sides[spec] = _load_side(spec, args, batch, zero, inputs)
        out[spec] = {"load_s": time.perf_counter() - start, "wall": [], "cpu": []}
        if args.eval:
            out[spec]["ppl"] = float(np.exp(sides[spec].loss(blocks, zero)))
            out[spec]["mezo"] = _mezo_gradients(sides[spec], batch, shapes)
        sides[spec].forward()  # warm-up: first-run allocations and kernel selection
    for _ in range(args.reps):
        for spec, side in sides.items():
            w, c = time.perf_counter(), time.process_time()
            side.forward()
            out[spec]["wall"].append(time.perf_counter() - w)
            out[spec]["cpu"].append(time.process_time() - c)
    return {"sides": out, "peak_rss_mb": _peak_rss_mb()}


def _spawn(args: argparse.Namespace, run: dict[str, Path], sides: list[str], *,
           evaluate: bool, reps: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "simulations.bench.edge_forward", "--worker",
           "--sides", ",".join(sides), "--blocks", str(run["blocks"]), "--config",
           str(run["config"]), "--model", str(args.model), "--batch", str(args.batch),
           "--reps", str(reps), "--threads", str(args.threads)]
    if evaluate:
        cmd.append("--eval")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"worker {sides} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT):])
    return result


def _eval_blocks(args: argparse.Namespace, tokenizer: Any, eos: int | None) -> Path:
    from kernels.edge_runtime import token_blocks
    from protocols.run_config import DataSection
    from simulations.devices import central_eval_texts, prepare_devices

    texts = central_eval_texts(prepare_devices(DataSection(), args.cache))
    blocks = token_blocks(tokenizer, texts, args.seq, eos_token_id=eos)
    pick = np.unique(np.linspace(0, len(blocks) - 1, num=args.eval_blocks).astype(int))
    fd, name = tempfile.mkstemp(prefix="edge-bench-", suffix=".npy")
    os.close(fd)
    np.save(name, blocks[pick])
    return Path(name)


def _measure(args: argparse.Namespace, run: dict[str, Path],
             specs: list[str]) -> dict[str, dict[str, Any]]:
    """Per side: ppl, MeZO gradients, load and peak RSS from its own process; forward times
    from one process that alternates all sides."""
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        alone = _spawn(args, run, [spec], evaluate=True, reps=1)
        rows[spec] = {**alone["sides"][spec], "peak_rss_mb": alone["peak_rss_mb"]}
        print(f"  {Path(spec).stem}: ppl {rows[spec]['ppl']:.2f}", file=sys.stderr, flush=True)
    timed = _spawn(args, run, specs, evaluate=False, reps=args.reps)["sides"]
    for spec in specs:
        rows[spec] |= {"cpu": statistics.median(timed[spec]["cpu"]),
                       "cpu_min": min(timed[spec]["cpu"]),
                       "wall": statistics.median(timed[spec]["wall"])}
    return rows


def _mezo_error(row: dict[str, Any], ref: dict[str, Any]) -> float:
    """Largest error of the projected gradients, relative to the reference's largest one."""
    got, want = np.array(row["mezo"]), np.array(ref["mezo"])
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def _compare(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from kernels.edge_export import export_edge
    from kernels.edge_runtime import CONFIG_NAME, read_config
    from protocols.run_config import LoraSection

    exports = {q: export_edge(args.model, args.export_root / f"{args.model.name}-{q}",
                              LoraSection(), quantization=q) for q in args.quantization}
    first = next(iter(exports.values()))
    eos = read_config(first)["eos_token_id"]
    run = {"blocks": _eval_blocks(args, Tokenizer.from_file(str(first / "tokenizer.json")), eos),
           "config": first / CONFIG_NAME}
    try:
        rows = _measure(args, run, ["torch", *(f"edge:{e}" for e in exports.values())])
    finally:
        run["blocks"].unlink()
    t = rows["torch"]
    print(f"model {args.model.name}, batch {args.batch}x{args.seq}, {args.threads} thread(s), "
          f"{args.reps} alternating reps; MeZO: {MEZO_DIRECTIONS} directions, eps {MEZO_EPS}")
    print(f"{'':<20}{'ppl':>8}{'cpu s':>8}{'wall s':>8}{'min cpu':>9}{'load s':>8}"
          f"{'RSS MB':>8}{'MB':>6}{'MeZO err':>10}")
    names = [("torch fp32 eager", "torch", None)] + [
        (f"ORT {q}", f"edge:{e}", e / "model.onnx") for q, e in exports.items()]
    for label, spec, onnx_file in names:
        s = rows[spec]
        size = f"{_size_mb(onnx_file):>6.0f}" if onnx_file else f"{'':>6}"
        print(f"{label:<20}{s['ppl']:>8.2f}{s['cpu']:>8.3f}{s['wall']:>8.3f}{s['cpu_min']:>9.3f}"
              f"{s['load_s']:>8.1f}{s['peak_rss_mb']:>8.0f}{size}{_mezo_error(s, t):>10.1%}")
    for label, spec, _ in names[1:]:
        o = rows[spec]
        print(f"{label} vs torch: {t['cpu'] / o['cpu']:.2f}x CPU time (median), "
              f"{t['cpu_min'] / o['cpu_min']:.2f}x (min), {t['wall'] / o['wall']:.2f}x wall "
              f"(goal >= 2x); perplexity {o['ppl'] / t['ppl'] - 1:+.1%} (goal within 10%); "
              f"peak RSS {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x; MeZO projected-gradient "
              f"error {_mezo_error(o, t):.1%}")


def _table(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from kernels.edge_export import calibration_blocks, export_edge
    from kernels.edge_quantize import QUANTIZATIONS, quantize_model
    from kernels.edge_runtime import CONFIG_NAME, read_config
    from protocols.run_config import LoraSection

    export = export_edge(args.model, args.export_root / f"{args.model.name}-fp32", LoraSection(),
                         quantization="fp32")
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    eos = read_config(export)["eos_token_id"]
    run = {"blocks": _eval_blocks(args, tokenizer, eos), "config": export / CONFIG_NAME}
    calibration = calibration_blocks(tokenizer, eos_token_id=eos)
    with tempfile.TemporaryDirectory(dir=args.export_root) as tmp:
        paths, quantize_s = {}, {}
        for name in QUANTIZATIONS:
            paths[name] = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            quantize_model(export / "model.onnx", paths[name], name, calibration=calibration)
            quantize_s[name] = time.perf_counter() - start
        rows = _measure(args, run, [f"onnx:{p}" for p in paths.values()])
        sizes = {name: _size_mb(p) for name, p in paths.items()}
    run["blocks"].unlink()
    base = rows[f"onnx:{paths['fp32']}"]
    print(f"| option | float act. | held-out ppl | vs fp32 | size MB | fwd CPU s (B={args.batch} "
          f"S={args.seq}) | speed vs fp32 | peak RSS MB | MeZO err vs fp32 | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path in paths.items():
        s = rows[f"onnx:{path}"]
        print(f"| {name} | {'yes' if QUANTIZATIONS[name].float_activations else 'no'} | "
              f"{s['ppl']:.1f} | {s['ppl'] / base['ppl'] - 1:+.1%} | {sizes[name]:.0f} | "
              f"{s['cpu']:.3f} | {base['cpu'] / s['cpu']:.2f}x | {s['peak_rss_mb']:.0f} | "
              f"{_mezo_error(s, base):.0%} | {quantize_s[name]:.0f} |")


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main(argv: list[str] | None = None) -> int:
    from kernels.base_model import converted_dir
    from kernels.edge_quantize import (
        DEFAULT_QUANTIZATION,
        FAST_FORWARD_QUANTIZATION,
        QUANTIZATIONS,
    )
    from protocols.cache_dir import default_cache_dir

    cache = default_cache_dir()
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.edge_forward",
        description="Time the edge client's quantized ONNX forward against torch fp32 eager.",
    )
    parser.add_argument("--model", type=Path, default=converted_dir(cache),
                        help="local causal-LM folder (default: the prepared SmolLM2)")
    parser.add_argument("--cache", type=Path, default=cache, help="fedtune cache folder")
    parser.add_argument("--export-root", type=Path, default=cache / "edge",
                        help="where exports are cached (default: CACHE/edge)")
    parser.add_argument("--quantization", nargs="+", choices=sorted(QUANTIZATIONS),
                        default=[DEFAULT_QUANTIZATION, FAST_FORWARD_QUANTIZATION],
                        help="ORT exports to compare with torch (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="blocks per forward")
    parser.add_argument("--seq", type=int, default=64, help="tokens per block")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for ppl")
    parser.add_argument("--reps", type=int, default=8, help="alternating timed forwards per side")
    parser.add_argument("--threads", type=int, default=1, help="threads per side")
    parser.add_argument("--table", action="store_true",
                        help="measure every quantization option instead (~15 min)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sides", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(_worker(args)), flush=True)
        return 0
    args.export_root.mkdir(parents=True, exist_ok=True)
    if args.table:
        _table(args)
    else:
        _compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
