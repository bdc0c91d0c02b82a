"""Weight-only quantized frozen linear layers with a LoRA path: formats, reference, module.

The frozen base of a LoRA client is read-only, so its weights can live in int8 (one scale
per output channel) or 4 bits (one scale, and optionally an offset, per group of
``group_size`` inputs) while only the adapter stays in float -- QLoRA's recipe (Dettmers
et al., 2023) without the NF4 codebook, so the same integer grid serves a plain torch
reference on CPU and a Triton kernel on GPU.

How it meets PEFT. :class:`QuantLinear` replaces the ``base_layer`` *inside* PEFT's
``lora.Linear`` (see :mod:`kernels.quantize_model`) instead of re-implementing LoRA. The
adapter keeps PEFT's parameter names, state dict, ``disable_adapter()`` and Opacus hooks,
so aggregation, export and DP-SGD are unchanged; the base becomes a module with buffers
and no parameters. Where PEFT's plain LoRA path is the only thing running (one adapter,
no dropout in training, no DoRA), ``quantize_model`` routes the whole layer through
:func:`quant_lora_linear`: one autograd node for base + LoRA, so the fused kernel does the
dequantize-matmul and the LoRA up-projection in one pass.

Why a custom ``torch.autograd.Function`` (:class:`QuantLoraFunction`): with
``F.linear(x, dequantize(w))`` autograd would keep the dequantized float weight alive until
backward -- the memory quantization was meant to save. The function keeps only the packed
weight and re-dequantizes in backward; it returns gradients for the input (so adapters in
earlier layers train) and for A and B, and never forms a gradient of the frozen weight.

Shapes: x (..., K) -> y (..., N); weight (N, K); LoRA A (r, K), B (N, r); M = rows of x.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
BACKENDS = ("auto", "torch", "triton")
INT8_MAX = 127
INT4_LEVELS = 15  # codes 0..15; symmetric codes are stored offset by 8


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized (N, K) weight: the tensors plus what is needed to read them.

    ``int8``: ``qweight`` int8 (N, K), ``scales`` (N,), w = q * s.
    ``int4``: ``qweight`` uint8 (N, K_pad // 2) with element 2j in the low nibble of byte j
    and 2j+1 in the high one (K_pad = K rounded up to ``group_size``, padding is zero);
    ``scales`` (N, K_pad // group_size). Symmetric: w = (q - 8) * s. Asymmetric: ``mins``
    (N, K_pad // group_size) holds each group's minimum, w = q * s + m -- a float zero point
    (m = -z s) as in GGUF Q4_1 or HQQ, so a group's extremes are represented exactly.
    """

    mode: str
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    in_features: int
    group_size: int  # 0 for int8 (one scale per output channel)

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def nbytes(self) -> int:
        parts = [self.qweight, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


def quantize(
    weight: torch.Tensor,
    mode: str,
    *,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Quantize an (N, K) float weight; round-to-nearest on the stored (rounded) scales.

    Scales are rounded to ``scale_dtype`` *before* the codes are chosen, so the codes are
    the nearest ones for the scales actually used at run time. fp16 scales cost 2 bytes
    per output channel (int8) or per group (int4) and add ~5e-4 relative error, far below
    the rounding error of the codes themselves.
    """
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}"
        )
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {list(MODES)}, got {mode!r}")
    w = weight.detach().float()
    if mode == "int8":
        if not symmetric:
            raise ValueError("int8 is symmetric per output channel; symmetric=False is int4 only")
        scales = _stored_scale(w.abs().amax(dim=1) / INT8_MAX, scale_dtype)  # (N,)
        q = torch.round(w / scales.float()[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        return QuantizedWeight("int8", q.to(torch.int8), scales, None, w.shape[1], 0)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {list(GROUP_SIZES)}, got {group_size}")
    n, k = w.shape
    k_pad = -(-k // group_size) * group_size
    groups = F.pad(w, (0, k_pad - k)).view(n, k_pad // group_size, group_size)  # (N, G, gs)
    if symmetric:
        scales = _stored_scale(groups.abs().amax(dim=2) / 7, scale_dtype)  # (N, G)
        q = torch.round(groups / scales.float()[..., None]).clamp_(-8, 7) + 8
        mins = None
    else:
        lo, hi = groups.amin(dim=2), groups.amax(dim=2)
        scales = _stored_scale((hi - lo) / INT4_LEVELS, scale_dtype)
        mins = lo.to(scale_dtype)
        q = torch.round((groups - mins.float()[..., None]) / scales.float()[..., None])
        q = q.clamp_(0, INT4_LEVELS)
    packed = pack_nibbles(q.view(n, k_pad).to(torch.uint8))
    return QuantizedWeight("int4", packed, scales, mins, k, group_size)


def _stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the storage dtype; an all-zero (or underflowing) row/group gets scale 1."""
    stored = scale.to(dtype)
    return torch.where(stored > 0, stored, torch.ones_like(stored))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, 2J) uint8 codes in [0, 15] -> (N, J) bytes, even index in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, J) bytes -> (N, 2J) uint8 codes; inverse of :func:`pack_nibbles`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight the quantized one stands for, computed in fp32 and cast once."""
    # In place after the first float copy: this runs in every forward and backward of the
    # reference path, and each extra (N, K) temporary is a full pass over memory.
    if qw.mode == "int8":
        w = qw.qweight.float().mul_(qw.scales.float()[:, None])
    else:
        n, gs = qw.out_features, qw.group_size
        q = unpack_nibbles(qw.qweight).float().view(n, -1, gs)  # (N, G, gs)
        s = qw.scales.float()[..., None]
        if qw.mins is not None:
            q.mul_(s).add_(qw.mins.float()[..., None])
        else:
            q.sub_(8).mul_(s)
        w = q.view(n, -1)[:, : qw.in_features]
    return w.to(dtype)


# --- backends: y = x W^T + b + s (x A^T) B^T and its input gradient -----------------------

LinearFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class QuantBackend:
    """Two functions on 2-D tensors; ``xa``/``gb`` are None when there is no LoRA term.

    ``linear(x, qw, bias, xa, lora_b, scaling)``: x (M, K), xa = x A^T (M, r) -> (M, N).
    ``grad_input(g, qw, gb, lora_a, scaling)``: g (M, N), gb = g B (M, r) -> (M, K).
    """

    name: str
    linear: LinearFn
    grad_input: LinearFn


Dequantizer = Callable[[QuantizedWeight, torch.dtype], torch.Tensor]


def reference_linear(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: torch.Tensor | None,
    xa: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    *,
    dequant: Dequantizer = dequantize,
) -> torch.Tensor:
    """Pure-torch forward; rounds like PEFT (base in x's dtype, LoRA in the adapter's).

    ``dequant`` makes the (N, K) weight: :func:`dequantize` here; the Triton backend's
    two-stage path passes its one-pass kernel and reuses the rest (cuBLAS for the matmul)."""
    y = F.linear(x, dequant(qw, x.dtype), None if bias is None else bias.to(x.dtype))
    if xa is not None and lora_b is not None:
        y = (y + (xa @ lora_b.T) * scaling).to(x.dtype)
    return y


def reference_grad_input(
    g: torch.Tensor,
    qw: QuantizedWeight,
    gb: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    scaling: float,
    *,
    dequant: Dequantizer = dequantize,
) -> torch.Tensor:
    """Pure-torch input gradient: g W (+ s (g B) A); ``dequant`` as in :func:`reference_linear`."""
    gx = g @ dequant(qw, g.dtype)
    if gb is not None and lora_a is not None:
        gx = (gx + (gb @ lora_a) * scaling).to(g.dtype)
    return gx


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def get_backend(name: str, device: torch.device) -> QuantBackend:
    """``auto`` picks Triton for CUDA tensors when triton is installed, else the reference."""
    if name not in BACKENDS:
        raise ValueError(f"unknown quantized-linear backend {name!r}; valid: {list(BACKENDS)}")
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        return QuantBackend("torch", reference_linear, reference_grad_input)
    from kernels import triton_quant_lora

    triton_quant_lora.require_triton()
    return QuantBackend("triton", triton_quant_lora.fused_linear,
                        triton_quant_lora.fused_linear_grad_input)


# --- autograd --------------------------------------------------------------------------------


class QuantLoraFunction(torch.autograd.Function):
    """y = x W_q^T + b (+ s x A^T B^T); gradients for x, A and B only.

    Saved for backward: x only if A is trained (FFA-LoRA freezes A, so x is not kept) and
    xa = x A^T (M, r) only if B is trained. The quantized weight is a constant of the
    layer and is read again in backward, never differentiated.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        qw: QuantizedWeight,
        bias: torch.Tensor | None,
        scaling: float,
        backend: QuantBackend,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, qw.in_features)  # (M, K)
        xa = None
        if lora_a is not None and lora_b is not None:
            xa = x2.to(lora_a.dtype) @ lora_a.T  # (M, r)
        y2 = backend.linear(x2, qw, bias, xa, lora_b, scaling)  # (M, N)
        ctx.qw, ctx.scaling, ctx.backend, ctx.lead = qw, scaling, backend, lead
        ctx.save_for_backward(
            x2 if ctx.needs_input_grad[1] else None,
            xa if ctx.needs_input_grad[2] else None,
            lora_a,
            lora_b,
        )
        return y2.view(*lead, qw.out_features)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa, lora_a, lora_b = ctx.saved_tensors
        qw: QuantizedWeight = ctx.qw
        g2 = grad_y.reshape(-1, qw.out_features)  # (M, N)
        gb = None if lora_b is None else g2.to(lora_b.dtype) @ lora_b  # (M, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            gx2 = ctx.backend.grad_input(g2, qw, gb, lora_a, ctx.scaling)  # (M, K)
            grad_x = gx2.view(*ctx.lead, qw.in_features)
        if ctx.needs_input_grad[1] and gb is not None:
            grad_a = (gb.T @ x2.to(gb.dtype)) * ctx.scaling  # (r, K)
        if ctx.needs_input_grad[2] and xa is not None:
            grad_b = (g2.to(xa.dtype).T @ xa) * ctx.scaling  # (N, r)
        return grad_x, grad_a, grad_b, None, None, None, None


# --- the module ------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` stand-in whose weight is stored quantized (buffers only).

    It has no parameters, so optimizers, Opacus and PEFT's trainable-parameter counts
    never see it; ``bias`` (if any) stays in float as a buffer.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self, weight: QuantizedWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown quantized-linear backend {backend!r}; valid: {list(BACKENDS)}"
            )
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.mode, self.group_size, self.backend = weight.mode, weight.group_size, backend
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("mins", weight.mins)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mode: str,
        *,
        group_size: int = 128,
        symmetric: bool = True,
        backend: str = "auto",
    ) -> QuantLinear:
        if linear.weight.requires_grad:
            raise ValueError("refusing to quantize a trainable nn.Linear: only the frozen base "
                             "is quantized (call requires_grad_(False) on it first)")
        qw = quantize(linear.weight, mode, group_size=group_size, symmetric=symmetric)
        return cls(qw, linear.bias, backend=backend)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.mode, self.qweight, self.scales, self.mins,
                               self.in_features, self.group_size)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quantized().nbytes + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_lora_linear(x, self, None, None, 0.0)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        sym = ", asymmetric" if self.mins is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"mode={self.mode}{group}{sym}, bias={self.bias is not None}, "
                f"backend={self.backend}")


def quant_lora_linear(
    x: torch.Tensor,
    base: QuantLinear,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``base(x) + scaling * x A^T B^T`` as one autograd node (LoRA dropout must be off)."""
    if x.shape[-1] != base.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {base.in_features}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together")
    if lora_a is not None and lora_b is not None and (
        lora_a.shape[1] != base.in_features or lora_b.shape != (base.out_features, lora_a.shape[0])
    ):
        raise ValueError(
            f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit a "
            f"{base.out_features}x{base.in_features} layer: expected A (r, {base.in_features}), "
            f"B ({base.out_features}, r)"
        )
    backend = get_backend(base.backend, x.device)
    out: torch.Tensor = QuantLoraFunction.apply(  # type: ignore[no-untyped-call]
        x, lora_a, lora_b, base.quantized(), base.bias, scaling, backend
    )
    return out
