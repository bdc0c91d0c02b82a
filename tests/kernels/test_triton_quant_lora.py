"""The Triton kernels against the pure-torch reference, under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated, so it is set here at
import time and the kernel module is reloaded if something imported it earlier. The
interpreter runs the kernel logic (tiling, masks, nibble unpacking, group scales, the LoRA
epilogue) with numpy, so fp32 results must match the reference to fp32 rounding
(rtol 1e-5, atol 2e-5 on outputs of magnitude ~10); speed is not measured here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"

from kernels import quant_linear
from kernels import triton_quant_lora as tq  # after TRITON_INTERPRET
from kernels.quant_linear import (
    QuantizedWeight,
    QuantLinear,
    quant_lora_linear,
    quantize,
    reference_grad_input,
    reference_linear,
)
from tests.measured import THREADS, close

if tq.is_available() and not tq.interpreting():
    tq = importlib.reload(tq)

needs_triton = pytest.mark.skipif(not tq.is_available(), reason="triton is not installed")

torch.set_num_threads(THREADS)
#: Every comparison here is a float tolerance on Triton's interpreter (numpy's BLAS) against
#: torch's: rerun by tests/cpu_matrix.py under other BLAS kernels.
pytestmark = pytest.mark.measured

CLOSE = {"rtol": 1e-5, "atol": 2e-5}
M, N, K, R = 19, 40, 100, 5  # none a multiple of a tile; K=100 pads int4 rows to a group


def _case(mode: str, group: int, sym: bool, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.1
    return quantize(w, mode, group_size=group, symmetric=sym)


def _tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(M, K, generator=gen), "bias": torch.randn(N, generator=gen),
            "a": torch.randn(R, K, generator=gen), "b": torch.randn(N, R, generator=gen),
            "g": torch.randn(M, N, generator=gen)}


@needs_triton
def test_kernels_run_in_the_interpreter() -> None:
    assert tq.is_available() and tq.interpreting()


@needs_triton
@pytest.mark.parametrize(
    ("mode", "group", "sym"),
    [("int8", 128, True), ("int4", 32, True), ("int4", 32, False), ("int4", 64, True),
     ("int4", 128, False)],
)
def test_forward_and_input_gradient_match_reference(mode: str, group: int, sym: bool) -> None:
    qw = _case(mode, group, sym)
    t = _tensors()
    xa, gb = t["x"] @ t["a"].T, t["g"] @ t["b"]  # (M, r) each
    y = tq.fused_linear(t["x"], qw, t["bias"], xa, t["b"], 2.0)
    close("fused forward", y, reference_linear(t["x"], qw, t["bias"], xa, t["b"], 2.0),
                               **CLOSE)
    gx = tq.fused_linear_grad_input(t["g"], qw, gb, t["a"], 2.0)
    close("fused grad input", gx, reference_grad_input(t["g"], qw, gb, t["a"], 2.0), **CLOSE)
    # no LoRA, no bias: the plain dequantize-matmul and its transpose
    close("plain forward", tq.fused_linear(t["x"], qw, None, None, None, 0.0),
                               reference_linear(t["x"], qw, None, None, None, 0.0), **CLOSE)
    close("plain grad input", tq.fused_linear_grad_input(t["g"], qw, None, None, 0.0),
                               reference_grad_input(t["g"], qw, None, None, 0.0), **CLOSE)


@needs_triton
@pytest.mark.parametrize(("bk", "group"), [(64, 32), (16, 64)])
def test_tiles_wider_and_narrower_than_a_group(monkeypatch: pytest.MonkeyPatch, bk: int,
                                               group: int) -> None:
    """BK > group gathers one scale per element; BK < group loads one per row."""
    monkeypatch.setitem(tq.INTERPRET_TILES, "BK", bk)
    qw = _case("int4", group, False, seed=3)
    t = _tensors(seed=4)
    xa, gb = t["x"] @ t["a"].T, t["g"] @ t["b"]
    close("wide/narrow forward", tq.fused_linear(t["x"], qw, t["bias"], xa, t["b"], 0.5),
                               reference_linear(t["x"], qw, t["bias"], xa, t["b"], 0.5), **CLOSE)
    close("wide/narrow grad input", tq.fused_linear_grad_input(t["g"], qw, gb, t["a"], 0.5),
                               reference_grad_input(t["g"], qw, gb, t["a"], 0.5), **CLOSE)


@needs_triton
@pytest.mark.parametrize(
    ("mode", "group", "sym"),
    [("int8", 128, True), ("int4", 32, True), ("int4", 32, False), ("int4", 64, True),
     ("int4", 128, False)],
)
def test_dequantize_kernel_matches_the_reference_dequantize(mode: str, group: int,
                                                            sym: bool) -> None:
    """The two-stage path's one-pass kernel makes the same (N, K) weight, padding cut off."""
    qw = _case(mode, group, sym, seed=9)
    w = tq.dequantize_weight(qw, torch.float32)
    assert w.shape == (N, K) and w.dtype == torch.float32
    close("dequantized weight", w, quant_linear.dequantize(qw), rtol=1e-6, atol=1e-7)
    assert tq.dequantize_weight(qw, torch.float16).dtype == torch.float16


@needs_triton
@pytest.mark.parametrize(("mode", "group", "sym"), [("int8", 128, True), ("int4", 32, False)])
def test_two_stage_path_matches_reference_and_is_chosen_from_enough_rows(
    monkeypatch: pytest.MonkeyPatch, mode: str, group: int, sym: bool,
) -> None:
    """Forced, it equals the reference; by default fp32 inputs take it from
    TWO_STAGE_MIN_ROWS rows on (M here), the fused kernel below."""
    qw = _case(mode, group, sym, seed=10)
    t = _tensors(seed=11)
    xa, gb = t["x"] @ t["a"].T, t["g"] @ t["b"]
    calls: list[int] = []
    dequant = tq.dequantize_weight
    monkeypatch.setattr(tq, "dequantize_weight",
                        lambda q, dtype: calls.append(1) or dequant(q, dtype))
    close("two-stage forward", tq.fused_linear(t["x"], qw, t["bias"], xa, t["b"], 2.0,
                                               two_stage=True),
          reference_linear(t["x"], qw, t["bias"], xa, t["b"], 2.0), **CLOSE)
    close("two-stage grad input", tq.fused_linear_grad_input(t["g"], qw, gb, t["a"], 2.0,
                                                             two_stage=True),
          reference_grad_input(t["g"], qw, gb, t["a"], 2.0), **CLOSE)
    assert len(calls) == 2
    monkeypatch.setattr(tq, "TWO_STAGE_MIN_ROWS", M + 1)
    tq.fused_linear(t["x"], qw, None, None, None, 0.0)
    tq.fused_linear_grad_input(t["g"], qw, None, None, 0.0)
    assert len(calls) == 2  # M rows < the threshold: the fused kernels
    monkeypatch.setattr(tq, "TWO_STAGE_MIN_ROWS", M)
    tq.fused_linear(t["x"], qw, None, None, None, 0.0)
    tq.fused_linear_grad_input(t["g"], qw, None, None, 0.0)
    assert len(calls) == 4


def test_two_stage_rule_for_16_bit_inputs_needs_a_large_weight() -> None:
    """16-bit inputs: small layers keep the fused kernel at any row count, large ones take
    the two-stage path from TWO_STAGE_MIN_ROWS rows; fp32 inputs from the rows alone."""
    small = _case("int8", 128, True)  # 40 x 100
    large = QuantizedWeight(mode="int4", qweight=torch.zeros(4096, 2048, dtype=torch.uint8),
                            scales=torch.ones(4096, 64), mins=None, group_size=64,
                            in_features=4096)
    rows = tq.TWO_STAGE_MIN_ROWS
    assert not tq.two_stage_chosen(rows, small, torch.bfloat16)
    assert tq.two_stage_chosen(rows, large, torch.bfloat16)
    assert not tq.two_stage_chosen(rows - 1, large, torch.bfloat16)
    assert tq.two_stage_chosen(rows, small, torch.float32)
    assert not tq.two_stage_chosen(rows - 1, small, torch.float32)


@needs_triton
def test_autograd_through_the_triton_backend_matches_torch_backend() -> None:
    qw = _case("int4", 32, True, seed=5)
    t = _tensors(seed=6)
    grads = []
    for backend in ("triton", "torch"):
        layer = QuantLinear(qw, t["bias"], backend=backend)
        x = t["x"].reshape(1, M, K).clone().requires_grad_()
        a, b = t["a"].clone().requires_grad_(), t["b"].clone().requires_grad_()
        y = quant_lora_linear(x, layer, a, b, 4.0)
        y.backward(t["g"].reshape(1, M, N))
        grads.append((y.detach(), x.grad, a.grad, b.grad))
    for what, got, want in zip(("y", "dx", "da", "db"), *grads, strict=True):
        close(f"autograd triton vs torch {what}", got, want, **CLOSE)


@needs_triton
def test_half_precision_inputs() -> None:
    """16-bit activations, as on GPU: operands are rounded to fp16, so ~1e-3 relative.

    fp16, not bf16: Triton 3.9's interpreter computes ``tl.dot`` on bf16 operands wrongly
    (a 16x16 bf16 dot came out ~1e10 off here, a plain bf16 load/store is exact), so the
    bf16 path can only be checked on a GPU; it differs from fp16 only in the dtype.
    """
    qw = _case("int4", 64, False, seed=7)
    t = _tensors(seed=8)
    x = t["x"].half()
    xa = x.float() @ t["a"].T
    y = tq.fused_linear(x, qw, t["bias"], xa, t["b"], 1.0)
    assert y.dtype == torch.float16
    want = reference_linear(x.float(), qw, t["bias"], xa, t["b"], 1.0)
    close("fp16 forward", y.float(), want, rtol=1e-2, atol=2e-2)


@needs_triton
def test_empty_batch_and_device_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    qw = _case("int8", 128, True)
    assert tq.fused_linear(torch.zeros(0, K), qw, None, None, None, 0.0).shape == (0, N)
    monkeypatch.setattr(tq, "interpreting", lambda: False)
    with pytest.raises(tq.TritonUnavailable, match="triton kernels need CUDA tensors, got cpu"):
        tq.fused_linear(torch.zeros(2, K), qw, None, None, None, 0.0)


def test_module_imports_without_triton_and_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh copy of the module, imported while ``import triton`` fails."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("tq_without_triton", tq.__file__)
    assert spec is not None and spec.loader is not None
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    assert not bare.is_available()
    with pytest.raises(bare.TritonUnavailable, match=r"pip install 'fedtune\[gpu\]'"):
        bare.require_triton()
    with pytest.raises(bare.TritonUnavailable, match="use backend='torch'"):
        bare.fused_linear(torch.zeros(2, K), _case("int8", 128, True), None, None, None, 0.0)
    # and `auto` falls back to the reference where triton cannot be found
    monkeypatch.setattr(quant_linear, "triton_available", lambda: False)
    assert quant_linear.get_backend("auto", torch.device("cuda")).name == "torch"
