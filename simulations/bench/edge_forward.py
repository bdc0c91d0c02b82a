"""Benchmark: the edge client's quantized ONNX forward against the torch fp32 eager forward.

    python -m simulations.bench.edge_forward                 # SmolLM2, default quantization
    python -m simulations.bench.edge_forward --reps 10 --threads 2
    python -m simulations.bench.edge_forward --table         # every quantization option (~15 min)

Both sides score the same batch (``--batch`` blocks of ``--seq`` tokens cut from the held-out
Shakespeare speeches, zero adapter): torch is the PEFT LoRA model the torch client trains
(``model(input_ids, labels).loss``), ORT is :class:`kernels.edge_runtime.EdgeModel` on the
cached export (``token_nll``, log-softmax inside the graph). Perplexity is measured on
``--eval-blocks`` blocks spread over the held-out file. Goal: ORT >= 2x faster at a
perplexity within 10% of torch fp32.

Three fresh processes: one per side for perplexity and peak RSS (``VmHWM``: each side's own
footprint, model + one scored batch), then one that loads both sides and alternates their
forwards ``--reps`` times, so that load drift on a shared machine hits both alike. With one
thread per side the process CPU time is the steadier measure on a busy box; wall time is
reported too. Every ratio printed comes from numbers measured in the same run. The first
run exports the model (~3 min); later runs reuse the export (``CACHE/edge``).
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
from typing import Any

import numpy as np
import numpy.typing as npt

RESULT = "RESULT "
Side = tuple[Callable[[npt.NDArray[np.int64]], float], Callable[[], None]]


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


def _load_side(spec: str, args: argparse.Namespace, batch: npt.NDArray[np.int64]) -> Side:
    """``(score(blocks) -> mean loss, forward())`` for ``torch``, ``edge:DIR`` or ``onnx:FILE``."""
    kind, _, where = spec.partition(":")
    if kind == "torch":
        import torch

        from kernels.base_model import load_causal_lm
        from kernels.lm_eval import mean_token_loss
        from kernels.lora import attach_lora
        from protocols.run_config import LoraSection

        torch.set_num_threads(args.threads)
        model = attach_lora(load_causal_lm(args.model).model, LoraSection())
        x = torch.from_numpy(batch)

        def forward() -> None:
            with torch.no_grad():
                model(input_ids=x, labels=x).loss.item()

        return (lambda blocks: mean_token_loss(model, blocks, args.batch)[0]), forward
    if kind == "edge":
        from kernels.edge_runtime import EdgeModel

        edge = EdgeModel(Path(where), threads=args.threads)
        adapter = edge.zero_adapter()

        def edge_forward() -> None:
            edge.token_nll(batch, adapter)

        return (lambda blocks: float(np.log(edge.perplexity(blocks, adapter,
                                                            batch_size=args.batch))),
                edge_forward)
    import onnxruntime as ort  # a bare graph (the --table), zero adapter

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(where, options, providers=["CPUExecutionProvider"])
    zeros = {i.name: np.zeros(i.shape, np.float32) for i in session.get_inputs()
             if i.name != "input_ids"}

    def score(blocks: npt.NDArray[np.int64]) -> float:
        nll = [session.run(None, {"input_ids": blocks[i : i + args.batch], **zeros})[0]
               for i in range(0, len(blocks), args.batch)]
        return float(np.concatenate([n.reshape(-1) for n in nll]).mean(dtype=np.float64))

    def onnx_forward() -> None:
        session.run(None, {"input_ids": batch, **zeros})

    return score, onnx_forward


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a child process: load the sides, score the eval blocks, alternate timed forwards."""
    blocks: npt.NDArray[np.int64] = np.load(args.blocks)
    sides: dict[str, Side] = {}
    out: dict[str, dict[str, Any]] = {}
    for spec in args.sides.split(","):
        start = time.perf_counter()
        sides[spec] = _load_side(spec, args, blocks[: args.batch])
        out[spec] = {"load_s": time.perf_counter() - start, "wall": [], "cpu": []}
        if args.eval:
            out[spec]["ppl"] = float(np.exp(sides[spec][0](blocks)))
        sides[spec][1]()  # warm-up: first-run allocations and kernel selection
    for _ in range(args.reps):
        for spec, (_, forward) in sides.items():
            w, c = time.perf_counter(), time.process_time()
            forward()
            out[spec]["wall"].append(time.perf_counter() - w)
            out[spec]["cpu"].append(time.process_time() - c)
    return {"sides": out, "peak_rss_mb": _peak_rss_mb()}


def _spawn(args: argparse.Namespace, blocks: Path, sides: list[str], *, evaluate: bool,
           reps: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "simulations.bench.edge_forward", "--worker",
           "--sides", ",".join(sides), "--blocks", str(blocks), "--model", str(args.model),
           "--batch", str(args.batch), "--reps", str(reps), "--threads", str(args.threads)]
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
    from simulations.paths import partitions_dir, shakespeare_texts_dir
    from simulations.shakespeare_split import prepare_split

    split = prepare_split(shakespeare_texts_dir(args.cache), DataSection(),
                          partitions_dir(args.cache))
    texts = json.loads(split.eval_file.read_text(encoding="utf-8"))["texts"]
    blocks = token_blocks(tokenizer, texts, args.seq, eos_token_id=eos)
    pick = np.unique(np.linspace(0, len(blocks) - 1, num=args.eval_blocks).astype(int))
    fd, name = tempfile.mkstemp(prefix="edge-bench-", suffix=".npy")
    os.close(fd)
    np.save(name, blocks[pick])
    return Path(name)


def _measure(args: argparse.Namespace, blocks: Path, specs: list[str]) -> dict[str, dict[str, Any]]:
    """Per side: ppl, load and peak RSS from its own process; times from one shared one."""
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        alone = _spawn(args, blocks, [spec], evaluate=True, reps=1)
        rows[spec] = {"ppl": alone["sides"][spec]["ppl"], "load_s": alone["sides"][spec]["load_s"],
                      "peak_rss_mb": alone["peak_rss_mb"]}
        print(f"  {spec.rpartition('/')[2]}: ppl {rows[spec]['ppl']:.2f}", file=sys.stderr,
              flush=True)
    timed = _spawn(args, blocks, specs, evaluate=False, reps=args.reps)["sides"]
    for spec in specs:
        rows[spec] |= {"cpu": statistics.median(timed[spec]["cpu"]),
                       "cpu_min": min(timed[spec]["cpu"]),
                       "wall": statistics.median(timed[spec]["wall"])}
    return rows


def _compare(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from kernels.edge_export import export_edge
    from kernels.edge_runtime import read_config
    from protocols.run_config import LoraSection

    export = export_edge(args.model, args.export_root / f"{args.model.name}-{args.quantization}",
                         LoraSection(), quantization=args.quantization)
    eos = read_config(export)["eos_token_id"]
    blocks = _eval_blocks(args, Tokenizer.from_file(str(export / "tokenizer.json")), eos)
    try:
        rows = _measure(args, blocks, ["torch", f"edge:{export}"])
    finally:
        blocks.unlink()
    t, o = rows["torch"], rows[f"edge:{export}"]
    print(f"model {args.model.name}, batch {args.batch}x{args.seq}, {args.threads} thread(s), "
          f"{args.reps} alternating reps, ORT export {export.name} "
          f"({_size_mb(export / 'model.onnx'):.0f} MB)")
    print(f"{'':<22}{'ppl':>8}{'cpu s':>8}{'wall s':>8}{'min cpu':>9}{'load s':>8}"
          f"{'peak RSS MB':>13}")
    for name, s in (("torch fp32 eager", t), (f"ORT {args.quantization}", o)):
        print(f"{name:<22}{s['ppl']:>8.2f}{s['cpu']:>8.3f}{s['wall']:>8.3f}{s['cpu_min']:>9.3f}"
              f"{s['load_s']:>8.1f}{s['peak_rss_mb']:>13.0f}")
    print(f"speed-up ORT vs torch: {t['cpu'] / o['cpu']:.2f}x CPU time (median), "
          f"{t['cpu_min'] / o['cpu_min']:.2f}x (min), {t['wall'] / o['wall']:.2f}x wall "
          f"(goal >= 2x); perplexity {o['ppl'] / t['ppl'] - 1:+.1%} vs torch (goal within "
          f"10%); peak RSS {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


def _table(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    from kernels.edge_export import export_edge
    from kernels.edge_quantize import QUANTIZATIONS, calibration_blocks, quantize_model
    from kernels.edge_runtime import read_config
    from protocols.run_config import LoraSection

    export = export_edge(args.model, args.export_root / f"{args.model.name}-fp32", LoraSection(),
                         quantization="fp32")
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    eos = read_config(export)["eos_token_id"]
    blocks = _eval_blocks(args, tokenizer, eos)
    calibration = calibration_blocks(tokenizer, eos_token_id=eos)
    with tempfile.TemporaryDirectory(dir=args.export_root) as tmp:
        paths, quantize_s = {}, {}
        for name in QUANTIZATIONS:
            paths[name] = Path(tmp) / f"{name}.onnx"
            start = time.perf_counter()
            quantize_model(export / "model.onnx", paths[name], name, calibration=calibration)
            quantize_s[name] = time.perf_counter() - start
        rows = _measure(args, blocks, [f"onnx:{p}" for p in paths.values()])
        sizes = {name: _size_mb(p) for name, p in paths.items()}
    blocks.unlink()
    base = rows[f"onnx:{paths['fp32']}"]
    print(f"| option | held-out ppl | vs fp32 | size MB | fwd CPU s (B={args.batch} "
          f"S={args.seq}, median) | speed vs fp32 | peak RSS MB | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in paths.items():
        s = rows[f"onnx:{path}"]
        print(f"| {name} | {s['ppl']:.1f} | {s['ppl'] / base['ppl'] - 1:+.1%} | "
              f"{sizes[name]:.0f} | {s['cpu']:.3f} | {base['cpu'] / s['cpu']:.2f}x | "
              f"{s['peak_rss_mb']:.0f} | {quantize_s[name]:.0f} |")


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main(argv: list[str] | None = None) -> int:
    from kernels.base_model import converted_dir
    from kernels.edge_quantize import DEFAULT_QUANTIZATION, QUANTIZATIONS
    from simulations.paths import default_cache_dir

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
    parser.add_argument("--quantization", default=DEFAULT_QUANTIZATION,
                        choices=sorted(QUANTIZATIONS), help="ORT side's option")
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
