"""Quantized frozen base: storage formats, the pure-torch reference, PEFT integration.

Tolerances. Against an fp32 ``nn.Linear`` built from the *dequantized* weight the reference
must agree up to fp32 rounding (rtol 1e-5, atol 1e-5 on unit-scale data). Against the
*original* weight, every element is within half a quantization step (s/2, s the stored
scale of its channel or group), so each output is within ||x_m|| ||w_n - q(w_n)||
(Cauchy-Schwarz), which is checked exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kernels.base_model import load_causal_lm
from kernels.lora import attach_lora, get_adapter, set_adapter
from kernels.quant_linear import (
    QuantizedWeight,
    QuantLinear,
    dequantize,
    get_backend,
    pack_nibbles,
    quant_lora_linear,
    quantize,
    unpack_nibbles,
)
from kernels.quantize_model import DEFAULT_TARGETS, quantize_base
from protocols.run_config import ConfigError, LoraSection, ModelSection, RunConfig

torch.set_num_threads(1)

FORMATS = [("int8", 0, True), ("int4", 32, True), ("int4", 64, False), ("int4", 128, True),
           ("int4", 32, False)]
CLOSE = {"rtol": 1e-5, "atol": 1e-5}


def _weight(n: int = 24, k: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def _quant(w: torch.Tensor, mode: str, group: int, sym: bool) -> QuantizedWeight:
    return quantize(w, mode, group_size=group or 128, symmetric=sym)


def _step_per_element(qw: QuantizedWeight) -> torch.Tensor:
    """The stored scale that applies to each weight element, (N, K)."""
    s = qw.scales.float()
    if qw.mode == "int8":
        return s[:, None].expand(-1, qw.in_features)
    return s.repeat_interleave(qw.group_size, dim=1)[:, : qw.in_features]


def test_nibbles_round_trip() -> None:
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4  # even index low


@pytest.mark.parametrize(("mode", "group", "sym"), FORMATS)
def test_storage_layout_and_error_bound(mode: str, group: int, sym: bool) -> None:
    w = _weight()  # K = 100: int4 rows are padded to a whole number of groups
    qw = _quant(w, mode, group, sym)
    if mode == "int8":
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (24, 100)
        assert qw.scales.shape == (24,) and qw.mins is None
    else:
        k_pad = math.ceil(100 / group) * group
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (24, k_pad // 2)
        assert qw.scales.shape == (24, k_pad // group)
        assert (qw.mins is None) == sym
    err = (dequantize(qw) - w).abs()
    assert torch.all(err <= 0.5 * _step_per_element(qw) * (1 + 1e-3) + 1e-7)
    # Typical relative error of a Gaussian weight: int8 ~0.4 %, 4-bit ~8-12 %.
    rel = float(err.norm() / w.norm())
    assert rel < (0.01 if mode == "int8" else 0.15), rel


def test_zero_rows_and_groups_stay_zero() -> None:
    w = _weight(4, 64)
    w[1] = 0.0
    for mode, sym in (("int8", True), ("int4", True), ("int4", False)):
        deq = dequantize(quantize(w, mode, group_size=32, symmetric=sym))
        assert torch.isfinite(deq).all() and not deq[1].any()


def test_quantize_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be one of \\['int8', 'int4'\\], got 'int3'"):
        quantize(_weight(), "int3")
    with pytest.raises(ValueError, match=r"group_size must be one of .* got 48"):
        quantize(_weight(), "int4", group_size=48)
    with pytest.raises(ValueError, match="int8 is symmetric"):
        quantize(_weight(), "int8", symmetric=False)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        quantize(torch.zeros(3), "int8")


def _float_reference(qw: QuantizedWeight, bias: torch.Tensor | None) -> nn.Linear:
    ref = nn.Linear(qw.in_features, qw.out_features, bias=bias is not None)
    with torch.no_grad():
        ref.weight.copy_(dequantize(qw))
        if bias is not None:
            ref.bias.copy_(bias)
    ref.requires_grad_(False)
    return ref


@pytest.mark.parametrize(("mode", "group", "sym"), FORMATS)
def test_reference_matches_float_lora_forward_and_backward(mode: str, group: int,
                                                          sym: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    w, bias = _weight(), torch.randn(24, generator=gen)
    layer = QuantLinear(_quant(w, mode, group, sym), bias, backend="torch")
    ref = _float_reference(layer.quantized(), bias)
    a = torch.randn(4, 100, generator=gen).requires_grad_()
    b = torch.randn(24, 4, generator=gen).requires_grad_()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    x = torch.randn(3, 5, 100, generator=gen).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    scaling = 16 / 4
    gy = torch.randn(3, 5, 24, generator=gen)

    y = quant_lora_linear(x, layer, a, b, scaling)
    y_ref = ref(x2) + (x2 @ a2.T @ b2.T) * scaling
    torch.testing.assert_close(y, y_ref, **CLOSE)
    y.backward(gy)
    y_ref.backward(gy)
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, **CLOSE)
    # base only: the module's forward
    torch.testing.assert_close(layer(x2.detach()), ref(x2.detach()), **CLOSE)


@pytest.mark.parametrize(("mode", "group", "sym"), FORMATS)
def test_output_error_vs_original_weight_is_bounded(mode: str, group: int, sym: bool) -> None:
    w = _weight()
    qw = _quant(w, mode, group, sym)
    x = torch.randn(7, 100, generator=torch.Generator().manual_seed(2))
    y_q = QuantLinear(qw, backend="torch")(x)
    bound = x.norm(dim=1)[:, None] * (dequantize(qw) - w).norm(dim=1)[None, :]  # (M, N)
    assert torch.all((y_q - x @ w.T).abs() <= bound * (1 + 1e-5) + 1e-6)


def test_backward_keeps_no_float_weight_and_no_input_when_a_is_frozen() -> None:
    """FFA-LoRA: A frozen, so only xa = x A^T (M, r) is kept, never x (M, K) or W (N, K)."""
    layer = QuantLinear(quantize(_weight(), "int4", group_size=32), backend="torch")
    a = torch.randn(4, 100)  # frozen
    b = torch.zeros(24, 4, requires_grad=True)
    x = torch.randn(6, 100, requires_grad=True)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        y = quant_lora_linear(x, layer, a, b, 2.0)
    assert (6, 4) in saved
    assert (24, 100) not in saved and (6, 100) not in saved, saved
    y.sum().backward()
    assert b.grad is not None and x.grad is not None
    assert not list(layer.parameters())  # nothing of the base can receive a gradient
    assert all(not t.requires_grad for t in layer.buffers())


def test_module_checks_and_repr() -> None:
    linear = nn.Linear(100, 24)
    with pytest.raises(ValueError, match=r"refusing to quantize a trainable nn\.Linear"):
        QuantLinear.from_linear(linear, "int8")
    linear.requires_grad_(False)
    layer = QuantLinear.from_linear(linear, "int4", group_size=64, symmetric=False)
    assert "mode=int4, group_size=64, asymmetric" in repr(layer)
    assert set(layer.state_dict()) == {"qweight", "scales", "mins", "bias"}
    with pytest.raises(ValueError, match="input has 99 features, the layer expects 100"):
        layer(torch.zeros(2, 99))
    with pytest.raises(ValueError, match=r"LoRA shapes A \(4, 100\), B \(23, 4\) do not fit"):
        quant_lora_linear(torch.zeros(2, 100), layer, torch.zeros(4, 100), torch.zeros(23, 4), 1.0)
    with pytest.raises(ValueError, match="unknown quantized-linear backend 'cuda'"):
        QuantLinear(layer.quantized(), backend="cuda")
    assert get_backend("auto", torch.device("cpu")).name == "torch"


# --- whole models ----------------------------------------------------------------------------


def _peft(model_dir: Path):  # type: ignore[no-untyped-def]
    model = attach_lora(load_causal_lm(model_dir).model, LoraSection(r=4))
    rng = np.random.default_rng(0)  # non-zero B, so the LoRA path really contributes
    set_adapter(model, {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32)
                        for k, v in get_adapter(model).items()})
    return model


def _loss_and_grads(model, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("fused", [True, False])
def test_quantized_peft_model_matches_float_model_on_dequantized_weights(
    tiny_model_dir: Path, fused: bool
) -> None:
    quant, ref = _peft(tiny_model_dir), _peft(tiny_model_dir)
    keys_before = set(get_adapter(quant))
    report = quantize_base(quant, "int4", 32, symmetric=False, fused=fused, backend="torch")
    assert set(get_adapter(quant)) == keys_before  # adapter keys are the wire format
    assert report.layers == 2 * len(DEFAULT_TARGETS)  # 2 decoder layers x 7 projections
    assert report.fused == (2 * 5 if fused else 0)  # LoRA on q, v, o, up, down
    # 4-bit codes + fp16 scale and min per 32 weights = 5 bits vs 32: 0.156
    assert report.ratio == pytest.approx(5 / 32, rel=0.01)
    assert report.model_bytes_after < report.model_bytes_before
    quantized = dict(quant.named_modules())
    for name, module in ref.named_modules():
        if isinstance(quantized.get(name), QuantLinear):
            with torch.no_grad():
                module.weight.copy_(dequantize(quantized[name].quantized()))
    ids = torch.arange(40).reshape(2, 20) % 300
    quant.train()
    ref.train()
    logits_q, grads_q = _loss_and_grads(quant, ids)
    logits_r, grads_r = _loss_and_grads(ref, ids)
    torch.testing.assert_close(logits_q, logits_r, rtol=1e-4, atol=1e-4)
    assert grads_q.keys() == grads_r.keys() and grads_q
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_r[name], rtol=1e-4, atol=1e-5)
    with torch.no_grad(), quant.disable_adapter(), ref.disable_adapter():  # PEFT's own path
        torch.testing.assert_close(quant(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_quantize_base_options_and_errors(tiny_model_dir: Path) -> None:
    model = load_causal_lm(tiny_model_dir).model  # no PEFT: layers replaced directly
    report = quantize_base(model, "int4", 64, include_lm_head=True,
                           mode_overrides={"down_proj": "int8"})
    assert report.layers == 2 * 7 + 1 and report.fused == 0
    mods = dict(model.named_modules())
    assert isinstance(mods["lm_head"], QuantLinear)
    assert mods["model.layers.0.mlp.down_proj"].mode == "int8"
    assert mods["model.layers.0.mlp.up_proj"].mode == "int4"
    with pytest.raises(ValueError, match=r"no frozen nn.Linear named \['nope'\]"):
        quantize_base(load_causal_lm(tiny_model_dir).model, "int8", targets=["nope"])
    with pytest.raises(ValueError, match="quantize mode must be 'int8' or 'int4', got 'fp8'"):
        quantize_base(model, "fp8")


def test_fused_layer_refuses_merge(tiny_model_dir: Path) -> None:
    model = _peft(tiny_model_dir)
    quantize_base(model, "int8")
    with pytest.raises(NotImplementedError, match="cannot merge a LoRA adapter into a quantized"):
        model.merge_adapter()


# --- configuration and the torch client ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"quantize": "int3"},
         r"model.quantize = 'int3': must be one of \['none', 'int8', 'int4'\]"),
        ({"quant_group_size": 48}, r"model.quant_group_size = 48: must be one of \[32, 64, 128"),
        ({"quant_symmetric": 1}, r"model.quant_symmetric = 1: expected bool, got int"),
    ],
)
def test_bad_quantize_config_is_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_nested({"model": raw})


def test_torch_client_trains_on_a_quantized_base(tiny_model_dir: Path) -> None:
    from client.local_data import LocalData
    from client.torch_trainer import TorchLoraTrainer
    from client.trainer import TrainInstruction
    from protocols import keys
    from tests.conftest import mini_play

    data = LocalData("mini/ALL", train=tuple(mini_play().split("\n\n")), heldout=())
    plain = TorchLoraTrainer(tiny_model_dir, LoraSection(r=4))
    trainer = TorchLoraTrainer(tiny_model_dir, LoraSection(r=4),
                               model_section=ModelSection(quantize="int4"))
    assert trainer.quant_report is not None and trainer.quant_report.fused == 10
    start = get_adapter(trainer.model)
    outcome = trainer.train(start, data, TrainInstruction(1, 3, 4, 0.05, 16, 0))
    assert any(np.abs(v).sum() > 0 for k, v in outcome.tensors.items() if ".lora_B." in k)
    metrics = outcome.metrics
    assert metrics[keys.STEP_SECONDS] > 0 and metrics[keys.PEAK_MEMORY_BYTES] > 0
    plain_metrics = plain.train(start, data, TrainInstruction(1, 1, 4, 0.05, 16, 0)).metrics
    assert metrics[keys.BASE_WEIGHT_BYTES] < plain_metrics[keys.BASE_WEIGHT_BYTES]
    assert set(metrics) <= keys.CLIENT_METRIC_KEYS


def test_dp_sgd_runs_on_a_quantized_base_through_peft_s_own_lora_path(
    tiny_model_dir: Path,
) -> None:
    """Opacus hooks PEFT's lora_A / lora_B modules, so DP-SGD must not use the fused node."""
    from client.dp_sgd import DpSgdSettings
    from client.local_data import LocalData
    from client.torch_trainer import TorchLoraTrainer
    from client.trainer import TrainInstruction
    from protocols import keys
    from tests.conftest import mini_play

    data = LocalData("mini/ALL", train=tuple(mini_play().split("\n\n")), heldout=())
    settings = DpSgdSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=0)
    trainer = TorchLoraTrainer(tiny_model_dir, LoraSection(r=4), dpsgd=settings,
                               model_section=ModelSection(quantize="int8"))
    assert trainer.quant_report is not None and trainer.quant_report.fused == 0
    outcome = trainer.train(get_adapter(trainer.model), data,
                            TrainInstruction(1, 2, 4, 0.05, 16, 0))
    assert outcome.metrics[keys.DPSGD_EPSILON] > 0
    assert any(np.abs(v).sum() > 0 for k, v in outcome.tensors.items() if ".lora_B." in k)
