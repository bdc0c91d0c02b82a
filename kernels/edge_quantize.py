"""Quantization options for the exported float32 edge graph (ONNX Runtime contrib ops, CPU).

Only MatMuls whose B is a constant (the frozen base weights) are quantized. MatMuls whose B
is computed — LoRA (B is a graph input), attention (activations) — are always excluded by
name, so the adapter stays exact float32 and MeZO's ±εz perturbations are not rounded away.

Measured on SmolLM2-135M with ``python -m simulations.bench.edge_forward --table`` (2-core
AVX2 box without VNNI, ORT 1.31, 1 thread; held-out Shakespeare, 16 blocks x 64 tokens,
zero adapter; forward B=4 S=64, median CPU s of 8 forwards alternated over all options in
one process; RSS = peak of a process holding one option; "MeZO err" = largest error of
(L(θ+εz) - L(θ-εz))/2ε, ε=1e-3, 3 directions, relative to fp32's largest)::

    option         float act  ppl    vs fp32  MB   CPU s  vs fp32  RSS MB  MeZO err
    fp32           yes        185.1   +0.0%   653  1.192  1.00x     945       0%
    int8-ort       no         336.6  +81.9%   251  0.727  1.64x     486    5874%
    int8           no         328.2  +77.3%   250  0.733  1.63x     626    4514%
    int8-smooth    no         194.8   +5.3%   293  0.732  1.63x     679    1192%
    int8-keepdown  no         186.8   +0.9%   330  0.835  1.43x     693     868%
    int4           yes        226.7  +22.5%   201  1.198  1.00x     546      74%
    int4-b128      yes        275.9  +49.1%   193  1.253  0.95x     527      93%
    int4-gguf      yes        185.1   -0.0%   308  1.587  0.75x     652       0%
    int8-nbits     yes        185.1   +0.0%   270  2.043  0.58x     708       2%

(Torch fp32 eager on the same batch: 1.16-2.15 s across runs, ppl 185.07; with fewer models
in the process ``int8-smooth`` ran 1.98-2.01x faster than torch, ``int4-gguf`` 0.98-1.09x.)

What the numbers say:

- Dynamic int8 with one activation scale per tensor loses badly (ppl +77%): a few MatMul
  inputs carry massive activations (max/median channel range up to 3000x in ``down_proj``
  of layers 11 and 28). Full-range int8 weights are worse (ppl in the millions): without
  VNNI, MLAS's u8s8 kernel sums pairs of products in int16 and saturates, so weights use
  ±63. ``int8-smooth`` applies SmoothQuant (Xiao et al., ICML 2023) and keeps the MatMuls
  whose calibrated input is still spiky in float32: +5.3%, the fastest option within 10%.
- Any int8 *activation* breaks MeZO: rounding makes the loss piecewise constant at the
  scale of ε, so projected gradients come out 10-50x too large with random sign (also at
  ε=1e-2, also with calibrated static scales, also with MatMulNBits ``accuracy_level=4``).
  Those options are for forward-only evaluation; :attr:`QuantOption.float_activations`
  and ``edge_config.json`` say which is which.
- Weight-only MatMulNBits with float compute is smooth. SmolLM2's weights come from GGUF
  Q4_1 (blocks of 32 along K, ``min + d*q``), so ``int4-gguf`` (block 32, float zero points)
  reproduces them exactly — same perplexity and MeZO gradients as fp32 at half the RAM —
  while ORT's uint8-zero-point grid (``int4``) moves every weight by up to half a step
  (+22.5%). On this CPU its dequantizing kernel is slower than fp32 MatMul; with
  ``accuracy_level=4`` it was slower still.

Default: ``int4-gguf`` — the edge client trains with MeZO, so the fastest option within 10%
*among those with float activations* (fp32 is faster but 2.1x larger; ``int4`` is outside
10%). ``int8-smooth`` is :data:`FAST_FORWARD_QUANTIZATION`, for evaluation-only exports.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

SCHEMES = ("fp32", "int8", "int8-ort", "nbits")
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class QuantOption:
    """One named way to quantize the graph's constant-weight MatMuls."""

    name: str
    help: str
    scheme: str = field(metadata={"help": "'fp32', 'int8' (DynamicQuantizeMatMul), 'int8-ort' "
                                          "(ORT quantize_dynamic) or 'nbits' (MatMulNBits)"})
    bits: int = field(default=4, metadata={"help": "nbits: 4 or 8 bits per weight"})
    block_size: int = field(default=32, metadata={"help": "nbits: weights per scale along K"})
    accuracy_level: int = field(
        default=0, metadata={"help": "nbits: 0 = float32 compute on dequantized weights; 4 = "
                                     "int8 activations (per block) in the dot products"}
    )
    float_zero_point: bool = field(
        default=False, metadata={"help": "nbits: float zero points, grid exactly [min, max] "
                                         "(4 bits only)"}
    )
    head_bits: int = field(
        default=-1, metadata={"help": "nbits: bits of lm_head; -1 = bits, 0 = keep float32"}
    )
    smooth_alpha: float = field(
        default=0.0, metadata={"help": "int8: SmoothQuant migration strength; 0 = off"}
    )
    outlier_ratio: float = field(
        default=0.0, metadata={"help": "int8: keep a MatMul in float32 when its calibrated "
                                       "input has max/median channel range above this; 0 = off"}
    )
    weight_max: int = field(
        default=63, metadata={"help": "int8: weights in ±weight_max; 63 (7 bits) avoids the "
                                      "int16 saturation of u8s8 kernels on x86 without VNNI"}
    )
    keep_float: tuple[str, ...] = field(
        default=(), metadata={"help": "node-name regexes kept in float32 (sensitive layers)"}
    )

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme {self.scheme!r}: expected one of {SCHEMES}")
        if self.bits not in (4, 8) or self.head_bits not in (-1, 0, 4, 8):
            raise ValueError(f"bits {self.bits}, head_bits {self.head_bits}: expected 4 or 8 "
                             "(head_bits also -1 = same, 0 = float32)")
        if self.float_zero_point and self.bits != 4:
            raise ValueError("float_zero_point needs bits=4: ORT has no 8-bit MatMulNBits "
                             "kernel with float zero points")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size}: expected a power of two >= 16")
        if not 0.0 <= self.smooth_alpha < 1.0 or self.outlier_ratio < 0:
            raise ValueError(f"smooth_alpha {self.smooth_alpha} must be in [0, 1) and "
                             f"outlier_ratio {self.outlier_ratio} >= 0")
        if not 1 <= self.weight_max <= 127:
            raise ValueError(f"weight_max {self.weight_max}: expected 1..127")

    @property
    def float_activations(self) -> bool:
        """Whether activations stay float32, making the forward smooth in the adapter.

        MeZO's ``(L(θ+εz) - L(θ-εz)) / 2ε`` needs a loss that is smooth at the scale of ε.
        Quantizing activations (int8 schemes, MatMulNBits ``accuracy_level`` 4) rounds them
        to a grid; a θ change of ε ~ 1e-3 flips roundings and, with dynamic scales, moves
        the grid itself. On SmolLM2 the projected gradient then came out 10-50x too large
        with random sign (ε = 1e-3), and still with wrong signs at ε = 1e-2; calibrated
        static scales were no better. Weight-only options with float compute matched fp32
        to 2% (``int8-nbits``) and 0.0% (``int4-gguf``).
        """
        return self.scheme == "fp32" or (self.scheme == "nbits" and self.accuracy_level == 0)

    @property
    def needs_calibration(self) -> bool:
        return self.scheme == "int8" and bool(self.smooth_alpha or self.outlier_ratio)


QUANTIZATIONS: dict[str, QuantOption] = {}


def register(option: QuantOption) -> QuantOption:
    """Add an option to :data:`QUANTIZATIONS`; refuses a duplicate name."""
    if option.name in QUANTIZATIONS:
        raise ValueError(f"quantization {option.name!r} is already registered")
    QUANTIZATIONS[option.name] = option
    return option


register(QuantOption("fp32", "float32 weights, no quantization", "fp32"))
register(QuantOption("int8-ort", "ORT quantize_dynamic: per-channel 7-bit weights, per-tensor "
                     "uint8 activations (the naive baseline)", "int8-ort"))
register(QuantOption("int8", "DynamicQuantizeMatMul: per-channel 7-bit weights, per-tensor "
                     "uint8 activations", "int8"))
register(QuantOption("int8-smooth", "int8 + SmoothQuant (alpha 0.5) + MatMuls with spiky "
                     "inputs (max/median > 20) kept float32", "int8", smooth_alpha=0.5,
                     outlier_ratio=20.0))
register(QuantOption("int8-keepdown", "int8 + SmoothQuant (alpha 0.5), every down_proj kept "
                     "float32", "int8", smooth_alpha=0.5, keep_float=(r"/down_proj/",)))
register(QuantOption("int4", "MatMulNBits 4-bit, blocks of 32, uint8 zero points (ORT's RTN "
                     "grid), float compute", "nbits", bits=4, block_size=32))
register(QuantOption("int4-b128", "MatMulNBits 4-bit, blocks of 128 (ORT's default), float "
                     "compute", "nbits", bits=4, block_size=128))
register(QuantOption("int4-gguf", "MatMulNBits 4-bit, blocks of 32, float zero points, float "
                     "compute, lm_head float32: exact for GGUF Q4_1 sources", "nbits", bits=4,
                     block_size=32, float_zero_point=True, head_bits=0))
register(QuantOption("int8-nbits", "MatMulNBits 8-bit weight-only, blocks of 32, float "
                     "compute", "nbits", bits=8, block_size=32))

#: Export default: the edge client trains with MeZO, which needs float activations
#: (:attr:`QuantOption.float_activations`). ``int4-gguf`` reproduces SmolLM2's GGUF weights
#: exactly (edge and torch clients train the same function), 2.1x smaller, ~half the RAM.
DEFAULT_QUANTIZATION = "int4-gguf"
#: Fastest option within 10% of fp32 perplexity here: for forward-only evaluation, never for
#: MeZO steps (its activations are int8).
FAST_FORWARD_QUANTIZATION = "int8-smooth"


def quantization_option(name: str | QuantOption) -> QuantOption:
    """The registered option called ``name``; an unknown name lists the valid ones."""
    if isinstance(name, QuantOption):
        return name
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization {name!r}; valid: {', '.join(sorted(QUANTIZATIONS))}"
        ) from None


def quantize_model(
    src: Path,
    dst: Path,
    option: str | QuantOption,
    *,
    calibration: npt.NDArray[np.int64] | None = None,
) -> None:
    """Write ``src`` (the float32 export) quantized per ``option`` to ``dst``.

    ``calibration``: token blocks ``(N, S)`` for options that calibrate activations
    (:attr:`QuantOption.needs_calibration`). Use public text: a coordinator calibrating on
    client data would leak it into the model it ships.
    """
    opt = quantization_option(option)
    src, dst = Path(src), Path(dst)
    if opt.scheme == "fp32":
        shutil.copyfile(src, dst)
    elif opt.scheme == "int8-ort":
        _int8_ort(src, dst, opt)
    elif opt.scheme == "int8":
        _int8(src, dst, opt, calibration)
    else:
        _nbits(src, dst, opt)


def weight_matmuls(model: Any) -> tuple[list[str], list[str]]:
    """Names of MatMul nodes with a constant B (base weights) and without (LoRA, attention)."""
    constants = {t.name for t in model.graph.initializer}
    const_b: list[str] = []
    other: list[str] = []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            (const_b if node.input[1] in constants else other).append(node.name)
    return const_b, other


def _int8_ort(src: Path, dst: Path, opt: QuantOption) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    const_b, other = weight_matmuls(model)
    quantize_dynamic(
        model, str(dst), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
        weight_type=QuantType.QInt8, nodes_to_exclude=other + _kept(const_b, opt.keep_float),
        extra_options={"MatMulConstBOnly": True},
    )


def _int8(src: Path, dst: Path, opt: QuantOption,
          calibration: npt.NDArray[np.int64] | None) -> None:
    """Each constant-weight MatMul becomes ``DynamicQuantizeMatMul`` (com.microsoft).

    Weights: symmetric per output column. Activations: quantized by the op per tensor (one
    uint8 scale for the whole ``(B*S, K)`` input, so a row's result depends slightly on the
    other rows of the batch). Smoothing inserts ``Mul(x, 1/s)`` before the MatMuls that
    share ``x`` and folds ``s`` into their weights, ``s_j = max|x_j|^α / max_n|W_jn|^(1-α)``;
    the LoRA branch keeps reading the unsmoothed ``x``.
    """
    import onnx

    if opt.needs_calibration and (calibration is None or len(calibration) == 0):
        raise ValueError(f"quantization {opt.name!r} calibrates activations; pass "
                         "calibration= token blocks (see kernels.edge_export.calibration_blocks)")
    model = onnx.load(str(src))
    const_b, _ = weight_matmuls(model)
    chosen = set(const_b) - set(_kept(const_b, opt.keep_float))
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.name in chosen:
            groups.setdefault(node.input[0], []).append(node)
    act_max: dict[str, npt.NDArray[np.float32]] = {}
    if opt.needs_calibration:
        assert calibration is not None  # checked above
        act_max = activation_max(src, list(groups), calibration)
    if opt.outlier_ratio:
        spiky = {x for x, a in act_max.items()
                 if a.max() > opt.outlier_ratio * max(float(np.median(a)), 1e-6)}
        log.info("int8: %d MatMul inputs with outlier channels stay float32", len(spiky))
        groups = {x: nodes for x, nodes in groups.items() if x not in spiky}
    inits = {t.name: t for t in model.graph.initializer}
    before: dict[str, list[Any]] = {}  # node name -> nodes to insert in front of it
    replaced: dict[str, Any] = {}
    for x_name, nodes in groups.items():
        weights = {n.name: onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
                   for n in nodes}  # (K, N) each
        a_name, pre = x_name, before.setdefault(nodes[0].name, [])
        if opt.smooth_alpha:
            w_max = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)  # (K,)
            scale = smooth_scale(act_max[x_name], w_max, opt.smooth_alpha)
            inv = onnx.numpy_helper.from_array(1.0 / scale, f"{x_name}_smooth_inv")
            model.graph.initializer.append(inv)
            a_name = f"{x_name}_smoothed"
            pre.append(onnx.helper.make_node(
                "Mul", [x_name, inv.name], [a_name], name=f"{x_name}_smooth"))
            weights = {k: w * scale[:, None] for k, w in weights.items()}
        for node in nodes:
            q, col_scale = quantize_per_column(weights[node.name], opt.weight_max)
            base = node.input[1]
            tensors = [onnx.numpy_helper.from_array(q, f"{base}_i8"),
                       onnx.numpy_helper.from_array(col_scale, f"{base}_i8_scale"),
                       onnx.numpy_helper.from_array(np.zeros_like(q[0]), f"{base}_i8_zp")]
            model.graph.initializer.extend(tensors)
            replaced[node.name] = onnx.helper.make_node(
                "DynamicQuantizeMatMul", [a_name, *(t.name for t in tensors)],
                list(node.output), name=f"{node.name}_i8", domain="com.microsoft")
    nodes_out: list[Any] = []
    for node in model.graph.node:
        nodes_out.extend(before.get(node.name, ()))
        nodes_out.append(replaced.get(node.name, node))
    _finish(model, nodes_out, dst)


def smooth_scale(a_max: npt.NDArray[np.float32], w_max: npt.NDArray[np.float32],
                 alpha: float) -> npt.NDArray[np.float32]:
    """SmoothQuant's per-input-channel factor, clipped to a sane range."""
    a, w = np.maximum(a_max, 1e-5), np.maximum(w_max, 1e-5)
    return np.clip(a**alpha / w ** (1.0 - alpha), 1e-2, 1e3).astype(np.float32)


def quantize_per_column(
    weight: npt.NDArray[np.float32], weight_max: int
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Symmetric int8 quantization of MatMul's B ``(K, N)``, one scale per column ``(N,)``."""
    scale = np.abs(weight).max(axis=0) / weight_max
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -weight_max, weight_max).astype(np.int8)
    return q, scale


def activation_max(src: Path, tensors: list[str],
                   blocks: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.float32]]:
    """Per-channel max |x| of the named graph tensors over ``blocks``, zero adapter."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    del model
    zeros = {i.name: np.zeros([int(d) for d in i.shape], np.float32)
             for i in session.get_inputs() if i.name != "input_ids"}
    out: dict[str, npt.NDArray[np.float32]] = {}
    for i in range(0, len(blocks), 4):
        values = session.run(tensors, {"input_ids": blocks[i : i + 4], **zeros})
        for name, value in zip(tensors, values, strict=True):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)  # (K,)
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def _nbits(src: Path, dst: Path, opt: QuantOption) -> None:
    """Constant-weight MatMuls become ``MatMulNBits`` (com.microsoft), blocks along K."""
    import onnx

    model = onnx.load(str(src))
    const_b, _ = weight_matmuls(model)
    chosen = set(const_b) - set(_kept(const_b, opt.keep_float))
    inits = {t.name: t for t in model.graph.initializer}
    nodes_out: list[Any] = []
    for node in model.graph.node:
        bits = opt.head_bits if LM_HEAD in node.name and opt.head_bits != -1 else opt.bits
        if node.name not in chosen or bits == 0:
            nodes_out.append(node)
            continue
        weight = onnx.numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k, n = weight.shape  # (K, N)
        packed, scales, zero = quantize_blockwise(
            weight, bits=bits, block_size=opt.block_size,
            float_zero_point=opt.float_zero_point and bits == 4,
        )
        base = node.input[1]
        tensors = [onnx.numpy_helper.from_array(packed, f"{base}_q{bits}"),
                   onnx.numpy_helper.from_array(scales, f"{base}_q_scales"),
                   onnx.numpy_helper.from_array(zero, f"{base}_q_zp")]
        model.graph.initializer.extend(tensors)
        attrs = {"K": k, "N": n, "bits": bits, "block_size": opt.block_size}
        if opt.accuracy_level:
            attrs["accuracy_level"] = opt.accuracy_level
        nodes_out.append(onnx.helper.make_node(
            "MatMulNBits", [node.input[0], *(t.name for t in tensors)], list(node.output),
            name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs))
    _finish(model, nodes_out, dst)


def quantize_blockwise(
    weight: npt.NDArray[np.float32], *, bits: int, block_size: int, float_zero_point: bool
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], npt.NDArray[Any]]:
    """Asymmetric min/max round-to-nearest quantization in MatMulNBits' layout.

    ``weight`` is MatMul's B ``(K, N)``; each column is cut into blocks of ``block_size``
    along K. With uint8 zero points this is bit-identical to ORT's own RTN quantizer
    (a test checks it): the range is widened to include 0 and the zero point rounded. With
    float zero points a block's ``2**bits`` levels span exactly ``[min, max]``
    (``(q - zp) * scale = min + q * scale``), which reproduces weights that already lie on
    such a grid exactly — SmolLM2's GGUF Q4_1 weights do, in blocks of 32 along K.

    Returns packed ``(N, nb, block*bits/8)`` uint8, scales ``(N*nb,)`` float32 and zero
    points, float32 ``(N*nb,)`` or packed uint8, with ``nb = ceil(K / block)``.
    """
    k, n = weight.shape
    nb = -(-k // block_size)
    if nb * block_size != k:  # like ORT: pad K with zero rows; the op reads only K of them
        weight = np.pad(weight, ((0, nb * block_size - k), (0, 0)))
    levels = (1 << bits) - 1
    blocks = weight.T.reshape(n, nb, block_size)  # (N, nb, block)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)  # (N, nb)
    if not float_zero_point:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero: npt.NDArray[Any]
    if float_zero_point:
        q = np.rint((blocks - lo[..., None]) / scale[..., None])
        zero = (-lo / scale).astype(np.float32).reshape(-1)
    else:
        zp = np.clip(np.rint(-lo / scale), 0, levels)
        q = np.rint(blocks / scale[..., None]) + zp[..., None]
        # an odd block count leaves a spare nibble: ORT fills it with its default zp, 8
        zero = _pack(zp.astype(np.uint8), bits, pad=1 << (bits - 1)).reshape(-1)
    q = np.clip(q, 0, levels).astype(np.uint8)
    q.reshape(n, -1)[:, k:] = 0  # padding is never read; zero it as ORT does
    return _pack(q, bits), scale.reshape(-1), zero


def _pack(values: npt.NDArray[np.uint8], bits: int, pad: int = 0) -> npt.NDArray[np.uint8]:
    """Pack along the last axis, low bits first (element 2i in the low nibble)."""
    if bits == 8:
        return np.ascontiguousarray(values)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.full((*values.shape[:-1], 1), pad, np.uint8)], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _kept(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    return [n for n in names if any(re.search(p, n) for p in patterns)]


def _finish(model: Any, nodes: list[Any], dst: Path) -> None:
    """Swap in the new node list, drop now-unused float weights, declare com.microsoft."""
    import onnx

    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
