"""Benchmark: LoRA on a quantized frozen base (kernels/quant_linear.py) against a float base.

    python -m simulations.bench.quant_lora                     # CPU: layer shapes + SmolLM2 step
    python -m simulations.bench.quant_lora --perplexity        # held-out perplexity per format
    python -m simulations.bench.quant_lora --device cuda       # Triton kernels vs cuBLAS bf16

CPU (fp32, the pure-torch reference backend): forward+backward of one LoRA layer for each
``--shapes`` entry (M tokens x N outputs x K inputs; the defaults are SmolLM2-135M's
q/o, gate/up and down projections at batch 4 x 64 tokens) and a full LoRA training step
of the model (PEFT LoRA on the ``[lora]`` defaults, AdamW, random token ids), each variant
against the fp32 base: step-time ratio and weight-memory ratio, all measured in this run.

CUDA (bf16 activations, the Triton backend): for each shape, the fused dequantize-matmul
(base only, and with the LoRA term) and the input-gradient kernel against cuBLAS on a bf16
weight of the same shape (throughput ratio; goal >= 0.8x at about a quarter of the weight
bytes for 4-bit), after checking each kernel against the reference; then a full LoRA
training step of the model with a quantized base against a bf16 base, with peak memory.

Variants are ``mode[:g=N][:asym][:LAYER=MODE]``, e.g. ``int4:g=32:asym`` or
``int4:g=64:down_proj=int8``. Timings are medians of ``--rounds`` interleaved rounds
(after one untimed warm-up round), so load drift on a shared machine hits all variants.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

LAYER_SHAPES_CPU = "256x576x576,256x1536x576,256x576x1536"
LAYER_SHAPES_GPU = "4096x4096x4096,4096x11008x4096,4096x4096x11008,4096x576x576"
PPL_VARIANTS = ("none,int8,int4:g=64,int4:g=128,int4:g=32,int4:g=32:asym,int4:g=64:asym,"
                "int4:g=128:asym,int4:g=64:down_proj=int8")


@dataclass(frozen=True)
class Variant:
    """One base format; ``mode == "none"`` is the float base."""

    spec: str
    mode: str = "none"
    group_size: int = 128
    symmetric: bool = True
    overrides: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        mode, *options = spec.split(":")
        if mode not in ("none", "int8", "int4"):
            raise ValueError(f"variant {spec!r}: mode must be none, int8 or int4")
        group, symmetric, overrides = 128, True, {}
        for opt in options:
            key, _, value = opt.partition("=")
            if opt == "asym":
                symmetric = False
            elif key == "g" and value.isdigit():
                group = int(value)
            elif value in ("int8", "int4"):
                overrides[key] = value
            else:
                raise ValueError(f"variant {spec!r}: unknown option {opt!r} "
                                 "(use g=N, asym or LAYER=int8|int4)")
        return cls(spec, mode, group, symmetric, overrides)

    def apply(self, model: Any, *, backend: str = "auto") -> Any:
        """Quantize ``model`` in place; the report, or None for the float base."""
        if self.mode == "none":
            return None
        from kernels.quantize_model import quantize_base

        return quantize_base(model, self.mode, self.group_size, symmetric=self.symmetric,
                             mode_overrides=self.overrides, backend=backend)


def _shapes(spec: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in spec.split(","):
        m, n, k = (int(v) for v in item.lower().split("x"))
        shapes.append((m, n, k))
    return shapes


def _clock() -> tuple[float, float]:
    """(wall, process CPU) seconds: with one thread, CPU time is steadier on a busy host."""
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def _medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))


# --- CPU: one layer --------------------------------------------------------------------------


def _dense_lora(x: Any, w: Any, a: Any, b: Any, scaling: float) -> Any:
    """PEFT's arithmetic on a float base: x W^T + s (x A^T) B^T."""
    import torch.nn.functional as F

    return F.linear(x, w) + (x.to(a.dtype) @ a.T @ b.T) * scaling


def _dense_lora_grad_input(g: Any, w: Any, a: Any, b: Any, scaling: float) -> Any:
    return g @ w + ((g.to(b.dtype) @ b) @ a) * scaling


def _backward(forward: Callable[[], Any], grad: Any) -> None:
    import torch

    torch.autograd.backward(forward(), grad)


def cpu_layers(shapes: list[tuple[int, int, int]], variants: list[Variant], rank: int,
               rounds: int, steps: int) -> None:
    import torch

    from kernels.quant_linear import QuantLinear, quant_lora_linear, quantize

    print(f"\n[layer] forward+backward of one LoRA layer (r={rank}), fp32, torch reference")
    print(f"{'M x N x K':<18} {'variant':<18} {'wall ms':>8} {'x fp32':>7} {'CPU ms':>8} "
          f"{'x fp32':>7} {'weight MB':>10} {'x fp32':>7}")
    for m, n, k in shapes:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=gen) * 0.02
        x = torch.randn(m, k, generator=gen).requires_grad_()
        a = (torch.randn(rank, k, generator=gen) * 0.01).requires_grad_()
        b = (torch.randn(n, rank, generator=gen) * 0.01).requires_grad_()
        gy = torch.randn(m, n, generator=gen)
        runs = {"fp32": partial(_backward, partial(_dense_lora, x, w, a, b, 2.0), gy)}
        sizes = {"fp32": w.numel() * 4}
        for v in variants:
            if v.mode == "none":
                continue
            layer = QuantLinear(quantize(w, v.mode, group_size=v.group_size,
                                         symmetric=v.symmetric), backend="torch")
            sizes[v.spec] = layer.nbytes
            runs[v.spec] = partial(_backward, partial(quant_lora_linear, x, layer, a, b, 2.0), gy)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for round_ in range(rounds + 1):
            for name, run in runs.items():
                for _ in range(steps if round_ else 1):
                    t0 = _clock()
                    run()
                    if round_:
                        times[name].append(_since(t0))
        base = _medians(times["fp32"])
        for name in runs:
            wall, cpu = _medians(times[name])
            print(f"{f'{m}x{n}x{k}':<18} {name:<18} {1e3 * wall:>8.2f} {wall / base[0]:>7.2f} "
                  f"{1e3 * cpu:>8.2f} {cpu / base[1]:>7.2f} {sizes[name] / 1e6:>10.3f} "
                  f"{sizes[name] / sizes['fp32']:>7.3f}")


# --- a full LoRA training step (CPU fp32 or GPU bf16) ----------------------------------------


def _frozen_bytes(model: Any) -> int:
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def model_step(args: argparse.Namespace, variants: list[Variant]) -> None:
    import numpy as np
    import torch

    from kernels.base_model import load_causal_lm
    from kernels.lora import attach_lora
    from protocols.run_config import LoraSection

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    lora = LoraSection(r=args.rank)
    models: dict[str, tuple[Any, Any]] = {}
    for v in variants:
        model: Any = load_causal_lm(args.model).model
        model = model.to(device=args.device, dtype=dtype)
        model = attach_lora(model, lora)  # on its device before PEFT (opacus#820 habit)
        v.apply(model, backend="auto" if cuda else "torch")
        params = [p for p in model.parameters() if p.requires_grad]
        models[v.spec] = (model, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0))
    vocab = int(next(iter(models.values()))[0].get_input_embeddings().weight.shape[0])
    ids = np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq), dtype=np.int64)
    batch = torch.from_numpy(ids).to(args.device)

    def step(model: Any, optimizer: Any) -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        t0 = _clock()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return _since(t0)

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    peak: dict[str, float] = {}
    for round_ in range(args.rounds + 1):
        for name, (model, optimizer) in models.items():
            model.train()
            if round_ == 1 and cuda:  # not round 0: autotuning allocates scratch buffers
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            for _ in range(args.steps if round_ else 1):
                took = step(model, optimizer)
                if round_:
                    times[name].append(took)
            if round_ == 1 and cuda:
                peak[name] = (torch.cuda.max_memory_allocated() - resident) / 1e6
    kind = "bf16" if cuda else "fp32"
    print(f"\n[model] LoRA training step, {args.model.name}, r={args.rank} on "
          f"{lora.target_modules}, batch {args.batch} x {args.seq}, {args.device} {kind}")
    print(f"{'variant':<24} {'wall s':>7} {'x base':>7} {'CPU s':>7} {'x base':>7} "
          f"{'frozen MB':>10} {'x base':>7}" + (f" {'step peak MB':>13}" if cuda else ""))
    first = variants[0].spec
    base_t, base_b = _medians(times[first]), _frozen_bytes(models[first][0])
    for name, (model, _) in models.items():
        (wall, cpu), nbytes = _medians(times[name]), _frozen_bytes(model)
        print(f"{name:<24} {wall:>7.3f} {wall / base_t[0]:>7.2f} {cpu:>7.3f} "
              f"{cpu / base_t[1]:>7.2f} {nbytes / 1e6:>10.1f} {nbytes / base_b:>7.3f}"
              + (f" {peak[name]:>13.1f}" if cuda else ""))


# --- CUDA: the Triton kernels against cuBLAS -------------------------------------------------


#: The Triton backend's two paths (kernels.triton_quant_lora): one fused kernel, or a
#: one-pass dequantize kernel then cuBLAS. fedtune picks by rows, layer size and dtype
#: (kernels.triton_quant_lora.two_stage_chosen).
KERNEL_PATHS = ("fused", "two-stage")


def kernel_rows(shapes: list[tuple[int, int, int]], variants: list[Variant], rank: int,
                *, timed: bool = True,
                progress: Callable[[dict[str, Any]], None] | None = None,
                paths: tuple[str, ...] = KERNEL_PATHS,
                ) -> list[dict[str, Any]]:
    """Each Triton path (base only and with the LoRA term, forward and input gradient)
    against the pure-torch reference, and with ``timed`` against cuBLAS on a bf16 weight of
    the same shape. Each row says its ``path`` and whether fedtune takes it at that row
    count (``chosen``). On CUDA in bf16; without CUDA in float32 under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before the kernels were imported), correctness only.
    ``progress`` sees each row as soon as it is measured (autotuning takes minutes on a GPU)."""
    import torch
    import torch.nn.functional as F

    from kernels import triton_quant_lora as tq
    from kernels.quant_linear import quantize, reference_grad_input, reference_linear

    tq.require_triton()
    cuda = torch.cuda.is_available() and not tq.interpreting()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # numpy (the interpreter) has no bf16
    if timed and not cuda:
        raise ValueError("kernel timings need CUDA")
    if timed:
        from triton.testing import do_bench
    rows: list[dict[str, Any]] = []
    for m, n, k in shapes:
        gen = torch.Generator(device=dev).manual_seed(0)
        w = (torch.randn(n, k, device=dev, generator=gen) * 0.02).to(dtype)
        x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
        g = torch.randn(m, n, device=dev, generator=gen).to(dtype)
        a = torch.randn(rank, k, device=dev, generator=gen) * 0.01  # fp32, as PEFT keeps it
        b = torch.randn(n, rank, device=dev, generator=gen) * 0.01
        cublas: dict[str, Callable[[], Any]] = {
            "fwd": partial(F.linear, x, w),
            "fwd+lora": partial(_dense_lora, x, w, a, b, 2.0),
            "grad_x": partial(torch.matmul, g, w),
            "grad_x+lora": partial(_dense_lora_grad_input, g, w, a, b, 2.0),
        }
        base_ms = ({op: float(do_bench(fn, return_mode="median")) for op, fn in cublas.items()}
                   if timed else {})
        for v in variants:
            if v.mode == "none":
                continue
            qw = quantize(w, v.mode, group_size=v.group_size, symmetric=v.symmetric)
            xa, gb = x.float() @ a.T, g.float() @ b  # (M, r): the caller's skinny GEMMs
            refs: dict[str, Callable[[], Any]] = {
                "fwd": partial(reference_linear, x, qw, None, None, None, 0.0),
                "fwd+lora": partial(reference_linear, x, qw, None, xa, b, 2.0),
                "grad_x": partial(reference_grad_input, g, qw, None, None, 0.0),
                "grad_x+lora": partial(reference_grad_input, g, qw, gb, a, 2.0),
            }
            chosen = "two-stage" if tq.two_stage_chosen(m, qw, dtype) else "fused"
            for path in paths:
                two = path == "two-stage"
                fwd = partial(tq.fused_linear, two_stage=two)
                bwd = partial(tq.fused_linear_grad_input, two_stage=two)
                kernels: dict[str, Callable[[], Any]] = {
                    "fwd": partial(fwd, x, qw, None, None, None, 0.0),
                    "fwd+lora": partial(_fused_with_lora, fwd, x, qw, a, b, True),
                    "grad_x": partial(bwd, g, qw, None, None, 0.0),
                    "grad_x+lora": partial(_fused_with_lora, bwd, g, qw, a, b, False),
                }
                for op, kernel in kernels.items():
                    row = _kernel_row(kernel, refs[op], base_ms.get(op) if timed else None,
                                      (m, n, k))
                    row |= {"shape": f"{m}x{n}x{k}", "variant": v.spec, "op": op,
                            "path": path, "chosen": path == chosen,
                            "weight_vs_bf16": qw.nbytes / (w.numel() * 2), "dtype": str(dtype)}
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return rows


def _kernel_row(kernel: Callable[[], Any], ref: Callable[[], Any], cublas_ms: float | None,
                mnk: tuple[int, int, int]) -> dict[str, Any]:
    """Relative error against the reference; with a cuBLAS time, the kernel's time too."""
    want = ref().float()
    row: dict[str, Any] = {"rel_err": float((kernel().float() - want).norm() / want.norm())}
    if cublas_ms is not None:
        from triton.testing import do_bench

        ms = float(do_bench(kernel, return_mode="median"))
        m, n, k = mnk
        row |= {"ms": ms, "cublas_ms": cublas_ms, "ratio": cublas_ms / ms,
                "tflops": 2 * m * n * k / (ms * 1e-3) / 1e12}
    return row


def gpu_kernels(shapes: list[tuple[int, int, int]], variants: list[Variant], rank: int) -> None:
    print("\n[kernel] Triton fused kernels vs cuBLAS bf16 (median ms; ratio = cuBLAS time / "
          "kernel time, >= 0.8 is the goal; LoRA variants include the rank-r GEMMs)")
    print(f"{'M x N x K':<20} {'variant':<18} {'path':<10} {'op':<12} {'ms':>8} {'cuBLAS':>8} "
          f"{'ratio':>6} {'TFLOP/s':>8} {'weight x bf16':>13} {'max rel err':>11}")
    for r in kernel_rows(shapes, variants, rank):
        print(f"{r['shape']:<20} {r['variant']:<18} {r['path']:<10} {r['op']:<12} {r['ms']:>8.3f} "
              f"{r['cublas_ms']:>8.3f} {r['ratio']:>6.2f} {r['tflops']:>8.1f} "
              f"{r['weight_vs_bf16']:>13.3f} {r['rel_err']:>11.2e}")


def _fused_with_lora(kernel: Callable[..., Any], inp: Any, qw: Any, a: Any, b: Any,
                     forward: bool) -> Any:
    """The fused kernel plus the skinny rank-r GEMM the autograd function does first."""
    if forward:
        return kernel(inp, qw, None, inp.float() @ a.T, b, 2.0)  # xa = x A^T
    return kernel(inp, qw, inp.float() @ b, a, 2.0)  # gb = g B


# --- held-out perplexity ---------------------------------------------------------------------


def perplexity(args: argparse.Namespace, variants: list[Variant]) -> None:
    import numpy as np

    from kernels.base_model import load_causal_lm
    from kernels.causal_lm_data import token_blocks
    from kernels.data.formats import read_examples
    from kernels.lm_eval import mean_token_loss
    from kernels.quant_linear import QuantLinear, dequantize

    eval_file = args.eval_file or _default_eval_file(args.cache)
    examples, _ = read_examples(eval_file)
    texts = [e.text for e in examples if e.text is not None]
    if not texts:
        raise SystemExit(f"{eval_file}: no plain documents to score (conversations are left "
                         "out); give --eval-file a text dataset")
    print(f"\n[perplexity] {args.model.name} on {eval_file.name}: {args.ppl_blocks} blocks x "
          f"{args.ppl_seq} tokens (spread over the file, as server/central_eval.py)")
    print(f"{'variant':<26} {'perplexity':>10} {'vs none':>8} {'weights MB':>11} "
          f"{'rel. weight err':>15}")
    first = load_causal_lm(args.model)
    tokens = token_blocks(first.tokenizer, texts, args.ppl_seq)
    pick = np.unique(np.linspace(0, len(tokens) - 1,
                                 num=min(args.ppl_blocks, len(tokens))).astype(int))
    blocks = tokens[pick]
    originals = {k: t.clone() for k, t in first.model.state_dict().items()}
    reference: float | None = None
    for i, v in enumerate(variants):
        model = first.model if i == 0 else load_causal_lm(args.model).model
        report = v.apply(model, backend="torch")
        err_num = err_den = 0.0
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                w = originals[f"{name}.weight"]
                err_num += float((dequantize(module.quantized()) - w).pow(2).sum())
                err_den += float(w.pow(2).sum())
        loss, _ = mean_token_loss(model, blocks, batch_size=8)
        ppl = math.exp(loss)
        reference = reference or ppl
        size = report.bytes_after if report else sum(
            t.numel() * t.element_size() for n, t in originals.items()
            if n.endswith("proj.weight"))
        rel = math.sqrt(err_num / err_den) if err_den else 0.0
        print(f"{v.spec:<26} {ppl:>10.3f} {100 * (ppl / reference - 1):>+7.1f}% "
              f"{size / 1e6:>11.1f} {rel:>15.2e}")


def _default_eval_file(cache: Path) -> Path:
    from protocols.run_config import DataSection
    from simulations.devices import prepare_devices

    return prepare_devices(DataSection(), cache).eval_file


# --- entry point -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from kernels.base_model import converted_dir
    from protocols.cache_dir import default_cache_dir

    cache = default_cache_dir()
    default_model = converted_dir(cache)
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.quant_lora",
        description="LoRA on an int8/int4 quantized frozen base vs a float base: step time, "
                    "weight memory, kernel throughput (CUDA) and held-out perplexity.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", type=Path, default=default_model,
                        help=f"local causal-LM folder (default: {default_model})")
    parser.add_argument("--variants", default="none,int8,int4:g=32:asym,int4:g=64",
                        help="comma-separated variants, the first is the baseline "
                             "(mode[:g=N][:asym][:LAYER=MODE])")
    parser.add_argument("--shapes", default=None,
                        help="layer shapes MxNxK, comma-separated (default: "
                             f"{LAYER_SHAPES_CPU} on cpu, {LAYER_SHAPES_GPU} on cuda)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--batch", type=int, default=None, help="blocks per step (4 cpu, 8 cuda)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per block (64 cpu, 512 cuda)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-model", action="store_true", help="layer/kernel part only")
    parser.add_argument("--skip-layers", action="store_true", help="model step only")
    parser.add_argument("--perplexity", action="store_true",
                        help="held-out perplexity per variant instead of timings")
    parser.add_argument("--ppl-variants", default=PPL_VARIANTS)
    parser.add_argument("--ppl-blocks", type=int, default=24)
    parser.add_argument("--ppl-seq", type=int, default=64)
    parser.add_argument("--eval-file", type=Path, default=None,
                        help="held-out documents: a data file or folder (e.g. JSONL with a "
                             "'text' column; docs/data.md) (default: the central evaluation "
                             "set of the default simulation, its held-out speeches)")
    args = parser.parse_args(argv)
    args.cache = cache
    cuda = args.device == "cuda"
    args.batch = args.batch or (8 if cuda else 4)
    args.seq = args.seq or (512 if cuda else 64)
    shapes = _shapes(args.shapes or (LAYER_SHAPES_GPU if cuda else LAYER_SHAPES_CPU))
    try:
        variants = [Variant.parse(s.strip()) for s in args.variants.split(",") if s.strip()]
        ppl_variants = [Variant.parse(s.strip()) for s in args.ppl_variants.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    needs_model = args.perplexity or not args.skip_model
    if needs_model and not (args.model / "config.json").is_file():
        print(f"no model at {args.model}: run `fedtune prepare` or pass --model DIR",
              file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.perplexity:
        perplexity(args, ppl_variants)
        return 0
    print(f"device {args.device}, {args.threads} thread(s); medians of {args.rounds} rounds x "
          f"{args.steps} steps after a warm-up round")
    if not args.skip_layers:
        if cuda:
            gpu_kernels(shapes, variants, args.rank)
        else:
            cpu_layers(shapes, variants, args.rank, args.rounds, max(args.steps, 3))
    if not args.skip_model:
        model_step(args, variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
