"""Triton kernels for the quantized frozen base: fused dequantize-matmul (+ LoRA) and its
input gradient. The reference they must match is :mod:`kernels.quant_linear`.

Forward, one kernel per (BM, BN) output tile:  y = x W^T + b + s * xa B^T
  the K loop loads packed codes, dequantizes the (BN, BK) weight tile in registers and
  feeds the tensor cores in x's dtype; the epilogue adds the bias and the LoRA
  up-projection of xa = x A^T. The rank-r down-projection xa is one skinny GEMM done by
  the caller because backward needs it too (grad of B = s g^T xa): computing it inside
  every N tile would repeat it N/BN times and still need a store.
Backward, one kernel per (BM, BK) tile of grad_x:  gx = g W + s * gb A, with gb = g B.

The fused kernels never materialise the weight in float in global memory; int8 codes are
exact in bf16/fp16, so int8 applies its per-channel scale to the fp32 accumulator instead.

Training-sized inputs on large weights take a two-stage path instead: one kernel
dequantizes the whole (N, K) weight into x's dtype in a single pass, and cuBLAS does the
matmul. The GPU check on an H200 (BENCHMARKS.md) found the fused kernels at 0.1-0.6x cuBLAS
bf16 with 4096 rows on 4096-wide layers: every row tile dequantizes the same weight tiles
again (M / BM times) on the CUDA cores, while cuBLAS keeps the tensor cores fed. There one
extra pass over a bf16 copy of the layer's weight costs less; the copy lives only for the
call (autograd keeps the quantized weight, never the copy), as bitsandbytes does for 4-bit
training. Few rows (decoding, small evaluation batches) and small 16-bit layers keep the
fused kernel, which reads the packed weight once and writes nothing extra
(:func:`two_stage_chosen` has the rule and the measurements behind it).

Importing this module never fails: without triton, :func:`require_triton` says how to get
it. Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set
before this module was imported (Triton picks the interpreter at decoration time) -- that
is how the tests check the kernel logic without a GPU; speed is only meaningful on GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.quant_linear import QuantizedWeight, reference_grad_input, reference_linear

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the module stays importable; the kernels say what is missing
    triton = None
    _IMPORT_ERROR = exc

#: Tile shapes used under the interpreter (no autotuning: every config would run on CPU).
INTERPRET_TILES = {"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 4}
#: When forward and input gradient take the two-stage path (module docstring): from this
#: many rows (a training step of the default run has 8 x 64 = 512), for 16-bit inputs only
#: on weights of at least TWO_STAGE_MIN_WEIGHT elements. Measured on an H200 with 4096 rows
#: (BENCHMARKS.md, GPU check): at 4096 x 4096 and larger, two-stage 0.83-0.96x cuBLAS bf16
#: and fused 0.10-0.60x; at SmolLM2's 576 x 576 the fused kernel with LoRA 0.69-0.85x and
#: two-stage 0.26-0.45x (three launches where cuBLAS needs one). fp32 inputs always take
#: two-stage from TWO_STAGE_MIN_ROWS: the fused kernel's exact fp32 dot runs without tensor
#: cores (SmolLM2 int8 training step 0.289 s fused, 0.248 s two-stage).
TWO_STAGE_MIN_ROWS = 256
TWO_STAGE_MIN_WEIGHT = 1 << 22  # 2048 x 2048; between the measured shapes
#: Weight tile of the dequantize kernel (memory-bound: no autotuning).
DEQUANT_BN = 64
_MODE_CODE = {("int8", False): 0, ("int4", False): 1, ("int4", True): 2}  # (mode, has mins)


class TritonUnavailable(ImportError):
    """The triton backend was asked for but cannot run here; the message says why."""


def is_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter."""
    return triton is not None and type(_qlinear_fwd).__name__ == "InterpretedFunction"


def require_triton() -> None:
    if triton is None:
        raise TritonUnavailable(
            "the 'triton' quantized-linear backend needs the triton package "
            "(`pip install 'fedtune[gpu]'`) and a CUDA GPU; use backend='torch' (the pure "
            f"torch reference) otherwise. Import error: {_IMPORT_ERROR}"
        )


def _check_inputs(qw: QuantizedWeight, *tensors: torch.Tensor | None) -> None:
    require_triton()
    if qw.qweight.stride(-1) != 1 or qw.scales.stride(-1) != 1:
        raise ValueError("quantized weight tensors must have contiguous rows (call .contiguous())")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices))
    if device.type != "cuda" and not interpreting():
        raise TritonUnavailable(
            f"triton kernels need CUDA tensors, got {device}; to run them on CPU (slowly, "
            "for tests) set TRITON_INTERPRET=1 before importing kernels.triton_quant_lora"
        )


def _r_pad(rank: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two."""
    return max(16, int(triton.next_power_of_2(rank)))


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact products (as the reference); bf16/fp16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in ``dtype``, made in one pass: each value is computed in fp32 as
    :func:`kernels.quant_linear.dequantize` computes it, then cast once."""
    _check_inputs(qw, qw.qweight)
    n, k = qw.out_features, qw.in_features
    w = torch.empty((n, k), dtype=dtype, device=qw.qweight.device)
    group = max(qw.group_size, 1)
    # A tile within one int4 group loads one scale per row instead of one per element.
    bk = min(64, group) if qw.mode == "int4" else 64
    grid = (int(triton.cdiv(n, DEQUANT_BN)), int(triton.cdiv(k, bk)))
    _dequant_weight[grid](
        qw.qweight, qw.scales, qw.mins if qw.mins is not None else qw.scales, w, n, k,
        qw.qweight.stride(0), _sstride(qw), w.stride(0),
        MODE=_MODE_CODE[(qw.mode, qw.mins is not None)], GROUP=group, BN=DEQUANT_BN, BK=bk)
    return w


def two_stage_chosen(rows: int, qw: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether :func:`fused_linear` and :func:`fused_linear_grad_input` take the two-stage
    path by default for ``rows`` rows of ``dtype`` against ``qw``."""
    if rows < TWO_STAGE_MIN_ROWS:
        return False
    return dtype == torch.float32 or qw.out_features * qw.in_features >= TWO_STAGE_MIN_WEIGHT


def _two_stage(rows: int, qw: QuantizedWeight, dtype: torch.dtype,
               two_stage: bool | None) -> bool:
    return two_stage_chosen(rows, qw, dtype) if two_stage is None else two_stage


def fused_linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None,
    xa: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    *,
    two_stage: bool | None = None,
) -> torch.Tensor:
    """y (M, N) = x (M, K) W^T + bias + scaling * xa (M, r) B (N, r)^T, x's dtype.

    ``two_stage``: None chooses (:func:`two_stage_chosen`); True or False forces the
    dequantize + cuBLAS path or the fused kernel (benchmarks, tests)."""
    _check_inputs(qw, x, qw.qweight, bias, xa, lora_b)
    m, k = x.shape
    if m and _two_stage(m, qw, x.dtype, two_stage):
        return reference_linear(x, qw, bias, xa, lora_b, scaling, dequant=dequantize_weight)
    n = qw.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    has_lora = xa is not None and lora_b is not None
    rank = int(xa.shape[1]) if xa is not None else 0
    lb = lora_b if lora_b is not None else y  # dummy pointers are never read
    xa_ = xa if xa is not None else y
    args: list[Any] = [
        x, qw.qweight, qw.scales, qw.mins if qw.mins is not None else qw.scales,
        bias if bias is not None else qw.scales, xa_, lb, y,
        m, n, k, rank, float(scaling),
        x.stride(0), x.stride(1), qw.qweight.stride(0), _sstride(qw),
        xa_.stride(0), xa_.stride(1), lb.stride(0), lb.stride(1), y.stride(0),
    ]
    meta = {"MODE": _MODE_CODE[(qw.mode, qw.mins is not None)], "GROUP": max(qw.group_size, 1),
            "HAS_BIAS": bias is not None, "HAS_LORA": has_lora, "R_PAD": _r_pad(rank),
            "PRECISION": _precision(x.dtype)}
    _launch(_qlinear_fwd, _fwd_autotuned, args, meta, m, n)
    return y


def fused_linear_grad_input(
    g: torch.Tensor,
    qw: QuantizedWeight,
    gb: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    scaling: float,
    *,
    two_stage: bool | None = None,
) -> torch.Tensor:
    """gx (M, K) = g (M, N) W + scaling * gb (M, r) A (r, K), g's dtype; ``two_stage`` as
    in :func:`fused_linear`."""
    _check_inputs(qw, g, qw.qweight, gb, lora_a)
    m, n = g.shape
    if m and _two_stage(m, qw, g.dtype, two_stage):
        return reference_grad_input(g, qw, gb, lora_a, scaling, dequant=dequantize_weight)
    k = qw.in_features
    gx = torch.empty((m, k), dtype=g.dtype, device=g.device)
    if m == 0:
        return gx
    has_lora = gb is not None and lora_a is not None
    rank = int(gb.shape[1]) if gb is not None else 0
    la = lora_a if lora_a is not None else gx
    gb_ = gb if gb is not None else gx
    args: list[Any] = [
        g, qw.qweight, qw.scales, qw.mins if qw.mins is not None else qw.scales, gb_, la, gx,
        m, n, k, rank, float(scaling),
        g.stride(0), g.stride(1), qw.qweight.stride(0), _sstride(qw),
        gb_.stride(0), gb_.stride(1), la.stride(0), la.stride(1), gx.stride(0),
    ]
    meta = {"MODE": _MODE_CODE[(qw.mode, qw.mins is not None)], "GROUP": max(qw.group_size, 1),
            "HAS_LORA": has_lora, "R_PAD": _r_pad(rank), "PRECISION": _precision(g.dtype)}
    _launch(_qlinear_bwd, _bwd_autotuned, args, meta, m, k)
    return gx


def _sstride(qw: QuantizedWeight) -> int:
    """Row stride of scales/mins (int8 scales are 1-D: one per row)."""
    return int(qw.scales.stride(0))


def _launch(kernel: Any, tuned: Any, args: list[Any], meta: dict[str, Any], rows: int,
            cols: int) -> None:
    """Fixed small tiles under the interpreter, autotuned tiles on GPU."""
    if interpreting():
        tiles = dict(INTERPRET_TILES)
        kernel[(_grid(rows, cols, tiles, kernel is _qlinear_bwd),)](*args, **meta, **tiles)
        return

    def grid(cfg: dict[str, Any]) -> tuple[int]:
        return (_grid(rows, cols, cfg, kernel is _qlinear_bwd),)

    tuned[grid](*args, **meta)


def _grid(rows: int, cols: int, tiles: dict[str, Any], backward: bool) -> int:
    col_tile = tiles["BK"] if backward else tiles["BN"]
    return int(triton.cdiv(rows, tiles["BM"]) * triton.cdiv(cols, col_tile))


if triton is not None:

    @triton.jit  # type: ignore[untyped-decorator]
    def _tile_ids(  # type: ignore[no-untyped-def]
        pid, rows, cols, BM: tl.constexpr, BC: tl.constexpr, GROUP_M: tl.constexpr
    ):
        """Grouped ordering: GROUP_M row tiles share each column tile while it is in L2."""
        n_rows = tl.cdiv(rows, BM)
        n_cols = tl.cdiv(cols, BC)
        per_group = GROUP_M * n_cols
        first = (pid // per_group) * GROUP_M
        size = min(n_rows - first, GROUP_M)
        return first + (pid % per_group) % size, (pid % per_group) // size

    @triton.jit  # type: ignore[untyped-decorator]
    def _dequant_tile(  # type: ignore[no-untyped-def]
        q_ptr, s_ptr, m_ptr, rn, k0, N, K, stride_qn, stride_sn,
        MODE: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr,
    ):
        """The (BN, BK) weight tile at rows ``rn``, columns k0..k0+BK, as fp32.

        int8 returns the raw codes (the caller scales per output channel); int4 unpacks two
        codes per byte and applies each group's scale (and min).
        """
        if MODE == 0:
            rk = k0 + tl.arange(0, BK)
            mask = (rn[:, None] < N) & (rk[None, :] < K)
            codes = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=mask, other=0)
            w = codes.to(tl.float32)
        else:
            # Byte j holds columns 2j, 2j+1; rows are K_pad = K rounded up to GROUP long.
            pk = k0 // 2 + tl.arange(0, BK // 2)
            kmask = (k0 + 2 * tl.arange(0, BK // 2)) < (K + GROUP - 1) // GROUP * GROUP
            packed = tl.load(q_ptr + rn[:, None] * stride_qn + pk[None, :],
                             mask=(rn[:, None] < N) & kmask[None, :], other=0)
            q = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)  # (BN, BK)
            if BK <= GROUP:  # the tile lies in one group: one scale (and min) per row
                soff = rn * stride_sn + k0 // GROUP
                s = tl.load(s_ptr + soff, mask=rn < N, other=0.0).to(tl.float32)[:, None]
                if MODE == 2:
                    mn = tl.load(m_ptr + soff, mask=rn < N, other=0.0).to(tl.float32)[:, None]
            else:  # several groups per tile: gather a scale per element
                gk = (k0 + tl.arange(0, BK)) // GROUP
                soff2 = rn[:, None] * stride_sn + gk[None, :]
                smask = (rn[:, None] < N) & (gk[None, :] < (K + GROUP - 1) // GROUP)
                s = tl.load(s_ptr + soff2, mask=smask, other=0.0).to(tl.float32)
                if MODE == 2:
                    mn = tl.load(m_ptr + soff2, mask=smask, other=0.0).to(tl.float32)
            w = (q - 8.0) * s if MODE == 1 else q * s + mn
        return w

    @triton.jit  # type: ignore[untyped-decorator]
    def _qlinear_fwd(  # type: ignore[no-untyped-def]
        x_ptr, q_ptr, s_ptr, m_ptr, bias_ptr, xa_ptr, lb_ptr, y_ptr,
        M, N, K, R, scaling,
        stride_xm, stride_xk, stride_qn, stride_sn,
        stride_am, stride_ar, stride_bn, stride_br, stride_ym,
        MODE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)  # (BM, BK)
            w = _dequant_tile(q_ptr, s_ptr, m_ptr, rn, k0, N, K, stride_qn, stride_sn,
                              MODE, GROUP, BK)  # (BN, BK)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
        if MODE == 0:  # int8: per-output-channel scale on the exact integer products
            acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:  # + s * xa (BM, r) @ B^T (r, BN), in the adapter's fp32
            rr = tl.arange(0, R_PAD)
            xa = tl.load(xa_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar,
                         mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
            lb = tl.load(lb_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                         mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
            acc += scaling * tl.dot(xa.to(tl.float32), tl.trans(lb.to(tl.float32)),
                                    input_precision=PRECISION)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit  # type: ignore[untyped-decorator]
    def _qlinear_bwd(  # type: ignore[no-untyped-def]
        g_ptr, q_ptr, s_ptr, m_ptr, gb_ptr, la_ptr, gx_ptr,
        M, N, K, R, scaling,
        stride_gm, stride_gn, stride_qn, stride_sn,
        stride_bm, stride_br, stride_ar, stride_ak, stride_xm,
        MODE: tl.constexpr, GROUP: tl.constexpr, HAS_LORA: tl.constexpr,
        R_PAD: tl.constexpr, PRECISION: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BM, BK, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rk = pid_k * BK + tl.arange(0, BK)
        acc = tl.zeros((BM, BK), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                        mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # (BM, BN)
            w = _dequant_tile(q_ptr, s_ptr, m_ptr, rn, pid_k * BK, N, K, stride_qn,
                              stride_sn, MODE, GROUP, BK)  # (BN, BK)
            if MODE == 0:  # the contraction runs over output channels: scale the rows
                w *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
            acc = tl.dot(g, w.to(g.dtype), acc, input_precision=PRECISION)
        if HAS_LORA:  # + s * gb (BM, r) @ A (r, BK)
            rr = tl.arange(0, R_PAD)
            gb = tl.load(gb_ptr + rm[:, None] * stride_bm + rr[None, :] * stride_br,
                         mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
            la = tl.load(la_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                         mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
            acc += scaling * tl.dot(gb.to(tl.float32), la.to(tl.float32),
                                    input_precision=PRECISION)
        tl.store(gx_ptr + rm[:, None] * stride_xm + rk[None, :], acc.to(gx_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rk[None, :] < K))

    @triton.jit  # type: ignore[untyped-decorator]
    def _dequant_weight(  # type: ignore[no-untyped-def]
        q_ptr, s_ptr, m_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
        MODE: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        """One (BN, BK) tile of the dense weight, stored in w's dtype."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        k0 = tl.program_id(1) * BK
        w = _dequant_tile(q_ptr, s_ptr, m_ptr, rn, k0, N, K, stride_qn, stride_sn,
                          MODE, GROUP, BK)
        if MODE == 0:  # int8: the per-row scale the fused kernels apply to the accumulator
            w *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
        rk = k0 + tl.arange(0, BK)
        tl.store(w_ptr + rn[:, None] * stride_wn + rk[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=(rn[:, None] < N) & (rk[None, :] < K))

    def _configs() -> list[Any]:
        tiles = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                 (64, 64, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 32, 4, 5),
                 (32, 64, 64, 4, 4), (16, 64, 128, 4, 4), (128, 256, 64, 8, 3)]
        return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8},
                              num_warps=w, num_stages=s) for bm, bn, bk, w, s in tiles]

    _KEY = ["M", "N", "K", "MODE", "GROUP", "HAS_LORA"]
    _fwd_autotuned = triton.autotune(configs=_configs(), key=_KEY)(_qlinear_fwd)
    _bwd_autotuned = triton.autotune(configs=_configs(), key=_KEY)(_qlinear_bwd)
else:
    _qlinear_fwd = _qlinear_bwd = _fwd_autotuned = _bwd_autotuned = _dequant_weight = None
